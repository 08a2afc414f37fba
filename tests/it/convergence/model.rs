//! The history model of the convergence property: what Clerk did, advanced by
//! random operations, with every snapshot each webhook delivered (the candidates
//! the oracle picks the standing ones from).

use std::cmp::Reverse;
use std::collections::BTreeSet;

pub(crate) const ORGS: usize = 3;
pub(crate) const USERS: usize = 4;
pub(crate) const T0: i64 = 1_760_000_000_000;
/// Plans an organization's metadata may ask for; `gold` is not configured.
pub(crate) const PLANS: [Option<&str>; 4] = [None, Some("team"), Some("enterprise"), Some("gold")];
/// Clerk roles; `org:billing` is mapped to admin in this test's `[roles]`.
pub(crate) const ROLES: [&str; 4] = ["org:admin", "org:member", "org:billing", "org:viewer"];
pub(crate) const ROLE_MAP: &str = "[roles]\n\"org:billing\" = \"admin\"\n";

// ---- the history model: what Clerk did -------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct OrgSnap {
    pub(crate) idx: usize,
    pub(crate) name: String,
    pub(crate) plan: Option<&'static str>,
    pub(crate) updated_at: i64,
}

#[derive(Debug, Clone)]
pub(crate) struct MemSnap {
    pub(crate) id: usize,
    pub(crate) org: OrgSnap,
    pub(crate) user: usize,
    /// The user's display tag when the snapshot was taken.
    pub(crate) tag: String,
    pub(crate) role: &'static str,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
}

#[derive(Debug, Clone)]
pub(crate) enum Ev {
    OrgUpsert {
        created: bool,
        org: OrgSnap,
    },
    OrgDeleted {
        idx: usize,
    },
    /// Reconcile's snapshot of an organization (the standing one, as Clerk lists it).
    OrgListed {
        org: OrgSnap,
    },
    MemUpsert {
        created: bool,
        mem: MemSnap,
    },
    MemDeleted {
        mem: MemSnap,
        form: Form,
    },
    /// Reconcile's snapshot of an active membership, as Clerk lists it now: its
    /// standing snapshot's version, with the organization and the user as they are.
    MemListed {
        mem: MemSnap,
    },
    /// `version` is the user's `updated_at` (a tie repeats an earlier one).
    UserUpdated {
        user: usize,
        tag: String,
        version: i64,
    },
    UserDeleted {
        user: usize,
    },
}

/// How much an `organizationMembership.deleted` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// The membership as it was.
    Full,
    /// Ids, `public_user_data: {user_id}` and the envelope timestamp.
    IdsWithUser,
    /// Ids and the envelope timestamp only: no `public_user_data`, organization `{id}`.
    IdsOnly,
}

/// One event of the history: its svix id (without the run's prefix), envelope time
/// and content.
#[derive(Debug, Clone)]
pub(crate) struct HistEvent {
    pub(crate) svix: String,
    pub(crate) ts: i64,
    pub(crate) ev: Ev,
}

/// A snapshot as some webhook delivered it: its version, the svix id that carried
/// it (without the run's prefix) and its content.
#[derive(Debug, Clone)]
pub(crate) struct Cand<T> {
    pub(crate) version: i64,
    pub(crate) svix: String,
    pub(crate) value: T,
}

impl<T> Cand<T> {
    pub(crate) fn new(version: i64, svix: &str, value: T) -> Self {
        Self {
            version,
            svix: svix.to_owned(),
            value,
        }
    }
}

/// The snapshot that stands among `cands` by the rule of docs/schema.md: the newest
/// version, and on equal versions the smallest svix id. Every run prefixes its svix
/// ids with one string, so comparing the unprefixed ids compares the real ones.
pub(crate) fn best<T>(cands: &[Cand<T>]) -> Option<&T> {
    cands
        .iter()
        .max_by(|a, b| (a.version, Reverse(&a.svix)).cmp(&(b.version, Reverse(&b.svix))))
        .map(|c| &c.value)
}

#[derive(Debug, Clone, Default)]
pub(crate) struct OrgState {
    /// Every organization snapshot delivered (own events and embedded ones).
    pub(crate) cands: Vec<Cand<OrgSnap>>,
    pub(crate) deleted: bool,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct UserState {
    /// (version, svix, tag) of every user.updated.
    pub(crate) cands: Vec<Cand<String>>,
    pub(crate) deleted: bool,
}

/// Clerk's side of the story, advanced by random operations.
#[derive(Debug)]
pub(crate) struct Model {
    pub(crate) clock: i64,
    pub(crate) orgs: Vec<OrgState>,
    pub(crate) users: Vec<UserState>,
    /// Memberships ever created (the standing snapshot); `active` until removed by
    /// any cause.
    pub(crate) mems: Vec<(MemSnap, bool)>,
    /// Every snapshot of each membership delivered.
    pub(crate) mem_cands: Vec<Vec<Cand<MemSnap>>>,
    /// Deletions sent so far (Clerk may send one again, later, as a new message).
    pub(crate) deletes: Vec<Ev>,
    pub(crate) history: Vec<HistEvent>,
    /// Svix ids used (reconcile's repeat for an unchanged snapshot).
    pub(crate) svix_used: BTreeSet<String>,
}

impl Model {
    pub(crate) fn new() -> Self {
        Self::sized(ORGS, USERS)
    }

    /// A model of `orgs` organizations and `users` users (the nemesis's are larger).
    pub(crate) fn sized(orgs: usize, users: usize) -> Self {
        Self {
            clock: T0,
            orgs: vec![OrgState::default(); orgs],
            users: vec![UserState::default(); users],
            mems: Vec::new(),
            mem_cands: Vec::new(),
            deletes: Vec::new(),
            history: Vec::new(),
            svix_used: BTreeSet::new(),
        }
    }

    /// A strictly increasing clock shared by versions and envelope timestamps.
    pub(crate) fn tick(&mut self) -> i64 {
        self.clock += 10;
        self.clock
    }

    /// Sends `ev` at `ts`, recording every snapshot it carries. A reconcile
    /// snapshot's svix id is reconcile's (kind, id, version): one already sent is
    /// the same message again, a duplicate whatever it carries, so it is not sent.
    pub(crate) fn emit(&mut self, ts: i64, ev: Ev) {
        let svix = match &ev {
            Ev::OrgListed { org } => format!("reconcile_org_org_{}_{}", org.idx, org.updated_at),
            Ev::MemListed { mem } => format!("reconcile_mem_mem_{}_{}", mem.id, mem.updated_at),
            _ => format!("msg_{}", self.history.len()),
        };
        if !self.svix_used.insert(svix.clone()) {
            return;
        }
        let cand = |version, value| Cand::new(version, &svix, value);
        match &ev {
            Ev::OrgUpsert { org, .. } | Ev::OrgListed { org } => {
                self.orgs[org.idx]
                    .cands
                    .push(cand(org.updated_at, org.clone()));
            }
            Ev::MemUpsert { mem, .. }
            | Ev::MemListed { mem }
            | Ev::MemDeleted {
                mem,
                form: Form::Full,
            } => {
                self.orgs[mem.org.idx]
                    .cands
                    .push(cand(mem.org.updated_at, mem.org.clone()));
                if self.mem_cands.len() <= mem.id {
                    self.mem_cands.resize(mem.id + 1, Vec::new());
                }
                self.mem_cands[mem.id].push(Cand::new(mem.updated_at, &svix, mem.clone()));
                let standing = best(&self.mem_cands[mem.id]).cloned().expect("a snapshot");
                if let Some(m) = self.mems.get_mut(mem.id) {
                    m.0 = standing;
                }
            }
            Ev::UserUpdated { user, tag, version } => {
                self.users[*user]
                    .cands
                    .push(Cand::new(*version, &svix, tag.clone()));
            }
            Ev::OrgDeleted { .. } | Ev::UserDeleted { .. } | Ev::MemDeleted { .. } => {}
        }
        if matches!(
            ev,
            Ev::OrgDeleted { .. } | Ev::MemDeleted { .. } | Ev::UserDeleted { .. }
        ) {
            self.deletes.push(ev.clone());
        }
        self.history.push(HistEvent { svix, ts, ev });
    }

    /// The organization's standing snapshot (deleted or not).
    pub(crate) fn org_snap(&self, o: usize) -> Option<OrgSnap> {
        best(&self.orgs[o].cands).cloned()
    }

    pub(crate) fn live_org(&self, o: usize) -> Option<OrgSnap> {
        if self.orgs[o].deleted {
            None
        } else {
            self.org_snap(o)
        }
    }

    /// The user's display tag as their standing user.updated says ("0" before any).
    pub(crate) fn tag(&self, u: usize) -> String {
        best(&self.users[u].cands)
            .cloned()
            .unwrap_or_else(|| "0".to_owned())
    }

    pub(crate) fn active_mem(&self, o: usize, u: usize) -> Option<usize> {
        self.mems
            .iter()
            .position(|(m, active)| *active && m.org.idx == o && m.user == u)
    }

    /// The active membership of user `u` in organization `o`, else any active
    /// membership of `o`, else any active membership at all.
    pub(crate) fn some_active_mem(&self, o: usize, u: usize) -> Option<usize> {
        self.active_mem(o, u)
            .or_else(|| self.mems.iter().position(|(m, a)| *a && m.org.idx == o))
            .or_else(|| self.mems.iter().position(|(_, a)| *a))
    }

    /// Ends membership `i` with an organizationMembership.deleted webhook of `form`.
    pub(crate) fn delete_mem(&mut self, i: usize, form: Form) {
        let ts = self.tick();
        let mut mem = self.mems[i].0.clone();
        // The webhook carries the current organization and user data.
        if let Some(org) = self.org_snap(mem.org.idx) {
            mem.org = org;
        }
        mem.tag = self.tag(mem.user);
        self.mems[i].1 = false;
        self.emit(ts, Ev::MemDeleted { mem, form });
    }

    /// Adds user `u` to organization `o` under a new membership id.
    pub(crate) fn add_mem(&mut self, o: usize, u: usize, p: u8) {
        let Some(org) = self.live_org(o) else { return };
        if self.users[u].deleted || self.active_mem(o, u).is_some() {
            return;
        }
        let ts = self.tick();
        let mem = MemSnap {
            id: self.mems.len(),
            org,
            user: u,
            tag: self.tag(u),
            role: ROLES[usize::from(p) % ROLES.len()],
            created_at: ts,
            updated_at: ts,
        };
        self.mems.push((mem.clone(), true));
        self.emit(ts, Ev::MemUpsert { created: true, mem });
    }

    /// Applies one random operation; operations that make no sense in the current
    /// state (e.g. updating a deleted organization) are skipped.
    pub(crate) fn step(&mut self, op: u8, o: usize, u: usize, p: u8) {
        match op {
            // create an organization, or update it if it exists
            0..=2 => {
                if self.orgs[o].deleted {
                    return;
                }
                let created = self.orgs[o].cands.is_empty();
                let ts = self.tick();
                let mut snap = self.org_snap(o).unwrap_or(OrgSnap {
                    idx: o,
                    name: format!("Org {o}"),
                    plan: None,
                    updated_at: ts,
                });
                if created || op == 1 {
                    snap.name = format!("Org {o} v{}", p % 5);
                }
                if created || op == 2 {
                    snap.plan = PLANS[usize::from(p) % PLANS.len()];
                }
                snap.updated_at = ts;
                let ev = Ev::OrgUpsert { created, org: snap };
                self.emit(ts, ev);
            }
            // delete an organization, with or without membership webhooks (before or after)
            3 => {
                if self.live_org(o).is_none() {
                    return;
                }
                let members: Vec<usize> = (0..self.mems.len())
                    .filter(|&i| self.mems[i].1 && self.mems[i].0.org.idx == o)
                    .collect();
                let cascade = p % 3;
                if cascade == 1 {
                    for &i in &members {
                        self.delete_mem(i, form(p / 3));
                    }
                }
                let ts = self.tick();
                self.orgs[o].deleted = true;
                self.emit(ts, Ev::OrgDeleted { idx: o });
                for &i in &members {
                    if cascade == 2 {
                        self.delete_mem(i, form(p / 3));
                    } else {
                        self.mems[i].1 = false;
                    }
                }
            }
            // add a member (a re-add after a removal gets a new membership id)
            4..=7 | 15 => self.add_mem(o, u, p),
            // change a member's role
            8 | 9 => {
                let Some(i) = self.some_active_mem(o, u) else {
                    return;
                };
                let ts = self.tick();
                let (o, u) = (self.mems[i].0.org.idx, self.mems[i].0.user);
                let org = self.live_org(o).expect("active membership of a live org");
                let mut mem = self.mems[i].0.clone();
                mem.role = ROLES[usize::from(p) % ROLES.len()];
                mem.org = org;
                mem.tag = self.tag(u);
                mem.updated_at = ts;
                self.emit(
                    ts,
                    Ev::MemUpsert {
                        created: false,
                        mem,
                    },
                );
            }
            // remove a member
            10 => {
                if let Some(i) = self.some_active_mem(o, u) {
                    self.delete_mem(i, form(p));
                }
            }
            // a user changes their name and email
            11..=13 => {
                if self.users[u].deleted {
                    return;
                }
                let ts = self.tick();
                let tag = format!("{}", ts - T0);
                let ev = Ev::UserUpdated {
                    user: u,
                    tag,
                    version: ts,
                };
                self.emit(ts, ev);
            }
            // delete a user, with or without membership webhooks
            14 => {
                if self.users[u].deleted {
                    return;
                }
                let members: Vec<usize> = (0..self.mems.len())
                    .filter(|&i| self.mems[i].1 && self.mems[i].0.user == u)
                    .collect();
                if p % 2 == 1 {
                    for &i in &members {
                        self.delete_mem(i, form(p / 2));
                    }
                }
                let ts = self.tick();
                self.users[u].deleted = true;
                for &i in &members {
                    self.mems[i].1 = false;
                }
                self.emit(ts, Ev::UserDeleted { user: u });
            }
            // a second organization snapshot at the same updated_at, other content
            16 => {
                let Some(mut snap) = self.live_org(o) else {
                    return;
                };
                let ts = self.tick();
                snap.name = format!("Org {o} t{}", p % 5);
                if p.is_multiple_of(2) {
                    snap.plan = PLANS[usize::from(p / 2) % PLANS.len()];
                }
                let ev = Ev::OrgUpsert {
                    created: false,
                    org: snap,
                };
                self.emit(ts, ev);
            }
            // a second membership snapshot at the same updated_at, another role
            17 => {
                let Some(i) = self.some_active_mem(o, u) else {
                    return;
                };
                let ts = self.tick();
                let (o, u) = (self.mems[i].0.org.idx, self.mems[i].0.user);
                let mut mem = self.mems[i].0.clone();
                mem.role = ROLES[usize::from(p) % ROLES.len()];
                mem.org = self.live_org(o).expect("active membership of a live org");
                mem.tag = self.tag(u);
                let ev = Ev::MemUpsert {
                    created: false,
                    mem,
                };
                self.emit(ts, ev);
            }
            // a second user.updated at the same updated_at, other names
            18 => {
                let Some(version) = self.users[u].cands.iter().map(|c| c.version).max() else {
                    return;
                };
                if self.users[u].deleted {
                    return;
                }
                let ts = self.tick();
                let tag = format!("{}t{}", version - T0, p % 5);
                self.emit(
                    ts,
                    Ev::UserUpdated {
                        user: u,
                        tag,
                        version,
                    },
                );
            }
            // a member removed and added back at once, under a new membership id
            20 => {
                if let Some(i) = self.active_mem(o, u) {
                    self.delete_mem(i, form(p));
                    self.add_mem(o, u, p / 3);
                }
            }
            // reconcile lists the organization as it is
            21 => {
                if let Some(org) = self.live_org(o) {
                    let ts = self.tick();
                    self.emit(ts, Ev::OrgListed { org });
                }
            }
            // reconcile lists a membership as it is: its standing version, with the
            // organization and the user's details of now
            22 => {
                let Some(i) = self.some_active_mem(o, u) else {
                    return;
                };
                let mut mem = self.mems[i].0.clone();
                mem.org = self
                    .live_org(mem.org.idx)
                    .expect("active membership of a live org");
                mem.tag = self.tag(mem.user);
                let ts = self.tick();
                self.emit(ts, Ev::MemListed { mem });
            }
            // a deletion sent again, later, as a new message
            _ => {
                if self.deletes.is_empty() {
                    return;
                }
                let ev = self.deletes[usize::from(p) % self.deletes.len()].clone();
                let ts = self.tick();
                self.emit(ts, ev);
            }
        }
    }
}

/// The form of a membership removal, from a random byte.
pub(crate) fn form(p: u8) -> Form {
    match p % 3 {
        0 => Form::Full,
        1 => Form::IdsWithUser,
        _ => Form::IdsOnly,
    }
}
