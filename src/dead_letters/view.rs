//! Views of the dead letters: `dlq list`, `dlq show` and the console's pages.
//!
//! Guarantee: a view changes no letter. It reads through a [`DeadQueue`] session,
//! which gives every letter back as it was (see [`super::queue`]), and it keeps
//! summaries, never bodies — but the one body `show` returns. A console page keeps
//! its own rows and takes the queue's count from a passive declare; it reads down
//! to its rows and on only as far as the queue's order requires
//! ([`DeadQueue::read_at_most`]), unless a filter needs every letter looked at.

use std::collections::{BTreeSet, HashSet, VecDeque};

use serde::Serialize;
use serde_json::{Value, json};

use super::letter::{body_to_json, properties_to_json, table_to_json};
use super::queue::{DEFAULT_LOCK_WAIT, DeadQueue, Taken};
use super::{DeadLetter, DlqError};
use crate::config::Settings;

/// The most distinct types and workspaces a page suggests in its filters.
pub const MAX_SUGGESTIONS: usize = 100;

/// The dead-letter queue's content, head first.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// Queue name.
    pub queue: String,
    /// Number of dead letters listed.
    pub count: usize,
    /// The dead letters, head first.
    pub data: Vec<DeadLetter>,
    /// Dead letters that arrived while listing (kept behind these, not listed).
    pub arrived_during_listing: usize,
}

/// Runs `read` on a fresh session, then closes it whatever `read` returned, so the
/// letters go back even after an error; the first error wins.
async fn viewing<T>(
    settings: &Settings,
    read: impl AsyncFnOnce(&mut DeadQueue) -> Result<T, DlqError>,
) -> Result<(T, usize), DlqError> {
    let mut session = DeadQueue::open(settings, DEFAULT_LOCK_WAIT).await?;
    let outcome = read(&mut session).await;
    let closed = session.close().await;
    let value = outcome?;
    Ok((value, closed?.arrived))
}

/// Lists every dead letter (summaries only) and gives each back.
pub async fn list(settings: &Settings) -> Result<Listing, DlqError> {
    let (data, arrived) = viewing(settings, async |session: &mut DeadQueue| {
        let mut data = Vec::with_capacity(session.total());
        while let Some(taken) = session.next().await? {
            data.push(taken.letter);
        }
        Ok(data)
    })
    .await?;
    Ok(Listing {
        queue: settings.broker.dead_letter_queue.clone(),
        count: data.len(),
        data,
        arrived_during_listing: arrived,
    })
}

/// One dead letter whole.
#[derive(Debug, Clone, Serialize)]
pub struct DeadMessage {
    /// Its summary.
    #[serde(flatten)]
    pub letter: DeadLetter,
    /// Exchange it was last published to.
    pub exchange: String,
    /// Routing key it was last published with.
    pub routing_key: String,
    /// AMQP properties (`message_id`, `type`, `timestamp`, …).
    pub properties: Value,
    /// Headers (`x-error`, `x-death`, …).
    pub headers: Value,
    /// The body, parsed when it is JSON.
    pub body: Value,
    /// How many dead letters carry this id (the first is shown).
    pub copies: usize,
}

impl DeadMessage {
    fn of(taken: &Taken) -> Self {
        let d = &taken.delivery;
        DeadMessage {
            letter: taken.letter.clone(),
            exchange: d.exchange.as_str().to_owned(),
            routing_key: d.routing_key.as_str().to_owned(),
            properties: properties_to_json(&d.properties),
            headers: d
                .properties
                .headers()
                .as_ref()
                .map(table_to_json)
                .unwrap_or_else(|| json!({})),
            body: body_to_json(&d.data),
            copies: 0,
        }
    }
}

/// Shows one dead letter (the first of its copies), counting its copies; keeps
/// no other body.
pub async fn show(settings: &Settings, id: &str) -> Result<DeadMessage, DlqError> {
    let (found, _) = viewing(settings, async |session: &mut DeadQueue| {
        let mut found: Option<DeadMessage> = None;
        let mut copies = 0;
        while let Some(taken) = session.next().await? {
            if taken.letter.id.as_deref() == Some(id) {
                copies += 1;
                found.get_or_insert_with(|| DeadMessage::of(&taken));
            }
        }
        Ok(found.map(|m| DeadMessage { copies, ..m }))
    })
    .await?;
    found.ok_or_else(|| DlqError::NotFound {
        ids: vec![id.to_owned()],
    })
}

/// Which page of the list to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// 1-based page (a page past the last shows the last).
    pub page: usize,
    /// Rows per page.
    pub limit: usize,
}

/// One page of the dead letters, head first.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Queue name.
    pub queue: String,
    /// Dead letters in the queue when the view began.
    pub in_queue: usize,
    /// Those matching the filter (all of them without one).
    pub matching: usize,
    /// The page shown (1-based) and how many there are.
    pub page: usize,
    /// Pages of `matching` letters.
    pub pages: usize,
    /// The page's letters, head first.
    pub rows: Vec<DeadLetter>,
    /// Event types seen while reading (at most [`MAX_SUGGESTIONS`]), sorted.
    pub kinds: Vec<String>,
    /// Workspaces seen while reading (at most [`MAX_SUGGESTIONS`]), sorted.
    pub orgs: Vec<String>,
    /// Dead letters that arrived while reading (not counted, not shown).
    pub arrived: usize,
}

#[derive(Default)]
struct Suggestions {
    kinds: BTreeSet<String>,
    orgs: BTreeSet<String>,
}

impl Suggestions {
    fn note(&mut self, letter: &DeadLetter) {
        for (set, value) in [
            (&mut self.kinds, &letter.kind),
            (&mut self.orgs, &letter.workspace_id),
        ] {
            if let Some(v) = value
                && set.len() < MAX_SUGGESTIONS
                && !set.contains(v)
            {
                set.insert(v.clone());
            }
        }
    }
}

/// A filter on the dead letters.
pub type Filter<'a> = &'a (dyn Fn(&DeadLetter) -> bool + Send + Sync);

/// One page of the dead letters matching `filter` (all without one). Without a
/// filter it reads the queue only down to the page; with one it looks at every
/// letter, keeping the page's rows (and the last page's, for a page past the end).
pub async fn page(
    settings: &Settings,
    filter: Option<Filter<'_>>,
    want: PageRequest,
) -> Result<Page, DlqError> {
    let limit = want.limit.max(1);
    let (mut page, arrived) = viewing(settings, async |session: &mut DeadQueue| {
        let mut seen = Suggestions::default();
        let total = session.total();
        let mut page = Page {
            queue: settings.broker.dead_letter_queue.clone(),
            in_queue: total,
            ..Page::default()
        };
        match filter {
            None => {
                page.matching = total;
                page.pages = total.div_ceil(limit).max(1);
                page.page = want.page.clamp(1, page.pages);
                let first = (page.page - 1) * limit;
                session.read_at_most(first + limit);
                // The session may read past the page to keep the queue's order.
                while let Some(taken) = session.next().await? {
                    seen.note(&taken.letter);
                    if (first + 1..=first + limit).contains(&taken.letter.position) {
                        page.rows.push(taken.letter);
                    }
                }
            }
            Some(filter) => {
                let first = (want.page.max(1) - 1).saturating_mul(limit);
                let end = first.saturating_add(limit);
                // The last `limit` matches, for a page past the end.
                let mut tail: VecDeque<DeadLetter> = VecDeque::with_capacity(limit);
                while let Some(taken) = session.next().await? {
                    seen.note(&taken.letter);
                    if !filter(&taken.letter) {
                        continue;
                    }
                    let index = page.matching;
                    page.matching += 1;
                    if (first..end).contains(&index) {
                        page.rows.push(taken.letter.clone());
                    }
                    if tail.len() == limit {
                        tail.pop_front();
                    }
                    tail.push_back(taken.letter);
                }
                page.pages = page.matching.div_ceil(limit).max(1);
                page.page = want.page.clamp(1, page.pages);
                if page.page != want.page.max(1) {
                    let on_last = page.matching - (page.pages - 1) * limit;
                    page.rows = tail
                        .iter()
                        .skip(tail.len().saturating_sub(on_last))
                        .cloned()
                        .collect();
                }
            }
        }
        page.kinds = seen.kinds.into_iter().collect();
        page.orgs = seen.orgs.into_iter().collect();
        Ok(page)
    })
    .await?;
    page.arrived = arrived;
    Ok(page)
}

/// The svix ids more than one listed dead letter carries, in first-seen order.
pub fn repeated_ids(letters: &[DeadLetter]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut twice: Vec<String> = Vec::new();
    for id in letters.iter().filter_map(|l| l.id.as_ref()) {
        if !seen.insert(id) && !twice.contains(id) {
            twice.push(id.clone());
        }
    }
    twice
}
