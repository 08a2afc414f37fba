//! The nemesis's generator: a seeded Clerk history (the convergence [`Model`], the
//! one place an event kind is added), rendered as the webhooks Clerk sends for one
//! run's ids, in the order a Svix-like delivery sends them, plus the poisons.
//!
//! Guarantee: a pure function of the seed and the prefix. The prefix only renames
//! (ids, svix ids), so a failing run is reproduced by its seed alone.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::history::Webhook;
use crate::convergence::model::{HistEvent, Model};
use crate::convergence::oracle::render;

/// Organizations and users of one round's model.
pub const ORGS: usize = 8;
pub const USERS: usize = 12;

/// One round's history: the model, the webhooks in send order, the poisons.
pub struct Round {
    /// Clerk's truth after the round.
    pub model: Model,
    /// The run's id prefix of every entity and svix id.
    pub prefix: String,
    /// Every history event as its webhook, in the order they are first sent.
    pub webhooks: Vec<Webhook>,
    /// Signed, malformed events (a membership without `public_user_data`) that
    /// must end as dead letters.
    pub poisons: Vec<Webhook>,
}

/// The model operations the nemesis draws: every kind of Clerk change the model
/// knows but reconcile's own snapshots (21, 22), which no webhook carries.
fn draw_op(rng: &mut StdRng) -> u8 {
    loop {
        let op = rng.random_range(0u8..23);
        if op != 21 && op != 22 {
            return op;
        }
    }
}

/// The round `round` of seed `seed`: `ops` random model operations over
/// [`ORGS`] organizations and [`USERS`] users, rendered for `prefix`.
pub fn round(seed: u64, round: u64, ops: usize, prefix: &str) -> Round {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(round));
    let mut model = Model::sized(ORGS, USERS);
    // Organizations exist first more often than not (a history is mostly about
    // live organizations), then anything goes.
    for o in 0..ORGS {
        model.step(0, o, 0, rng.random());
    }
    for _ in 0..ops {
        let op = draw_op(&mut rng);
        let (o, u, p) = (
            rng.random_range(0..ORGS),
            rng.random_range(0..USERS),
            rng.random(),
        );
        model.step(op, o, u, p);
    }
    // Svix is best-effort ordered: each message may be sent up to 6 places late.
    let mut order: Vec<(usize, usize)> = (0..model.history.len())
        .map(|i| (i + rng.random_range(0..6), i))
        .collect();
    order.sort();
    let webhooks = order
        .into_iter()
        .map(|(_, i)| webhook(prefix, &model.history[i]))
        .collect();
    let poisons = (0..rng.random_range(1..4))
        .map(|i| poison(prefix, i))
        .collect();
    Round {
        model,
        prefix: prefix.to_owned(),
        webhooks,
        poisons,
    }
}

/// The webhook of one history event.
pub fn webhook(prefix: &str, e: &HistEvent) -> Webhook {
    let incoming = render(prefix, e);
    let kind = serde_json::from_slice::<serde_json::Value>(&incoming.body)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Webhook {
        svix_id: incoming.svix_id,
        kind,
        body: incoming.body,
    }
}

/// A signed membership event whose `data` lacks `public_user_data`: queued by
/// intake, dead-lettered by the worker (an organization no history event names).
pub fn poison(prefix: &str, i: usize) -> Webhook {
    let org = crate::common::story::org(&format!("{prefix}poison_org_{i}"));
    let who = crate::common::story::person(&format!("{prefix}poison_user_{i}"), "0");
    let incoming = org
        .membership(&format!("{prefix}poison_mem_{i}"), &who)
        .created(crate::convergence::model::T0)
        .with(|d| {
            d.as_object_mut()
                .expect("membership data is an object")
                .remove("public_user_data");
        })
        .svix(&format!("{prefix}poison_{i}"))
        .incoming();
    Webhook {
        svix_id: incoming.svix_id,
        kind: "organizationMembership.created".to_owned(),
        body: incoming.body,
    }
}
