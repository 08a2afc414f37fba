//! The fake's memory: organizations and memberships kept in Clerk's list order
//! (`created_at`, then id), so a page is a walk, never a sort of the whole list.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

/// The sort key of a list item: `created_at`, then id (an item without them sorts
/// first, as a missing value sorts before any).
pub(super) type Key = (Option<i64>, Option<String>);

fn key_of(item: &Value) -> Key {
    (
        item["created_at"].as_i64(),
        item["id"].as_str().map(str::to_owned),
    )
}

/// Items by id, walked in key order.
#[derive(Debug, Default)]
pub(super) struct List {
    items: BTreeMap<Key, Value>,
    keys: HashMap<String, Key>,
}

impl List {
    /// Adds `item`, or replaces the one of its id.
    pub(super) fn put(&mut self, item: Value) -> Key {
        let key = key_of(&item);
        let id = key.1.clone().unwrap_or_default();
        if let Some(old) = self.keys.insert(id, key.clone()) {
            self.items.remove(&old);
        }
        self.items.insert(key.clone(), item);
        key
    }

    /// Removes the item of `id`, returning it.
    pub(super) fn remove(&mut self, id: &str) -> Option<Value> {
        let key = self.keys.remove(id)?;
        self.items.remove(&key)
    }

    /// The item of `id`.
    pub(super) fn get(&self, id: &str) -> Option<&Value> {
        self.keys.get(id).and_then(|k| self.items.get(k))
    }

    /// The item at `key`.
    pub(super) fn at(&self, key: &Key) -> Option<&Value> {
        self.items.get(key)
    }

    /// Every item, oldest first.
    pub(super) fn values(&self) -> impl DoubleEndedIterator<Item = &Value> + Clone {
        self.items.values()
    }

    /// How many items there are.
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }
}

/// A change of the world the fake makes on its own, as Clerk would between two
/// page fetches of a scan.
#[derive(Debug, Clone)]
pub enum Change {
    /// The membership leaves Clerk.
    DeleteMembership(String),
    /// The organization is deleted, with its memberships.
    DeleteOrganization(String),
}

/// What Clerk holds: organizations, and memberships with an index by organization.
#[derive(Debug, Default)]
pub(super) struct World {
    pub(super) organizations: List,
    pub(super) memberships: List,
    /// Membership keys of each organization id.
    by_organization: HashMap<String, BTreeSet<Key>>,
}

fn organization_of(membership: &Value) -> String {
    membership["organization"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

impl World {
    pub(super) fn put_organization(&mut self, organization: Value) {
        self.organizations.put(organization);
    }

    pub(super) fn put_membership(&mut self, membership: Value) {
        let id = membership["id"].as_str().unwrap_or_default().to_owned();
        self.delete_membership(&id);
        let organization = organization_of(&membership);
        let key = self.memberships.put(membership);
        self.by_organization
            .entry(organization)
            .or_default()
            .insert(key);
    }

    pub(super) fn delete_membership(&mut self, id: &str) {
        if let Some(old) = self.memberships.remove(id)
            && let Some(keys) = self.by_organization.get_mut(&organization_of(&old))
        {
            keys.remove(&key_of(&old));
        }
    }

    /// Deletes an organization and its memberships, as Clerk does.
    pub(super) fn delete_organization(&mut self, id: &str) {
        self.organizations.remove(id);
        for key in self.by_organization.remove(id).unwrap_or_default() {
            if let Some(id) = key.1 {
                self.memberships.remove(&id);
            }
        }
    }

    /// The memberships of organization `id`, oldest first.
    pub(super) fn memberships_of<'a>(
        &'a self,
        id: &str,
    ) -> impl DoubleEndedIterator<Item = &'a Value> + Clone + 'a {
        self.by_organization
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|k| self.memberships.at(k))
    }

    pub(super) fn apply(&mut self, change: Change) {
        match change {
            Change::DeleteMembership(id) => self.delete_membership(&id),
            Change::DeleteOrganization(id) => self.delete_organization(&id),
        }
    }
}
