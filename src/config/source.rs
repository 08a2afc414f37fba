//! Where settings come from: the compiled-in defaults, the `PROVISIONER_CONFIG` file
//! merged over them, then the environment as one more TOML layer over both.
//!
//! Guarantee: every layer is a TOML table merged by the one rule of [`merge`], so
//! environment > file > defaults holds for every setting alike; a deprecated key
//! still takes effect under its new name and leaves a note saying so.

/// Environment variable → the dotted key it overrides. Errors about one of these
/// keys name the variable too, so an operator finds it whichever layer set it.
pub(super) const ENV_KEYS: [(&str, &str); 13] = [
    ("PROVISIONER_ENV", "environment"),
    ("PROVISIONER_LISTEN", "http.listen"),
    ("DATABASE_URL", "database.url"),
    ("AMQP_URL", "broker.url"),
    ("CLERK_WEBHOOK_SECRET", "clerk.webhook_secrets"),
    ("CLERK_INSTANCE_ID", "clerk.instance_id"),
    ("CLERK_SECRET_KEY", "clerk.secret_key"),
    ("CLERK_API_URL", "clerk.api_url"),
    ("PROVISIONER_API_TOKENS", "api.tokens"),
    ("PROVISIONER_OPS_TOKENS", "ops.tokens"),
    ("RUST_LOG", "log.filter"),
    ("LOG_FORMAT", "log.format"),
    ("PROVISIONER_METRICS_LISTEN", "metrics.worker_listen"),
];

/// Environment variable → the dotted key of an integer setting it overrides; the
/// value is read as an integer (anything else stays a string, and the setting's
/// deserialization names it).
pub(super) const ENV_INTEGER_KEYS: [(&str, &str); 10] = [
    (
        "PROVISIONER_HTTP_HEADER_READ_TIMEOUT_MS",
        "http.header_read_timeout_ms",
    ),
    (
        "PROVISIONER_HTTP_BODY_READ_TIMEOUT_MS",
        "http.body_read_timeout_ms",
    ),
    ("PROVISIONER_HTTP_IDLE_TIMEOUT_MS", "http.idle_timeout_ms"),
    ("PROVISIONER_HTTP_MAX_CONNECTIONS", "http.max_connections"),
    (
        "PROVISIONER_HTTP_MAX_INFLIGHT_WEBHOOKS",
        "http.max_inflight_webhooks",
    ),
    (
        "PROVISIONER_HTTP_WEBHOOK_BODY_TIMEOUT_MS",
        "http.webhook_body_timeout_ms",
    ),
    (
        "PROVISIONER_HTTP_MAX_CONNECTION_AGE_MS",
        "http.max_connection_age_ms",
    ),
    (
        "PROVISIONER_BROKER_QUORUM_INITIAL_GROUP_SIZE",
        "broker.quorum_initial_group_size",
    ),
    ("PROVISIONER_OPS_SESSION_MAX_AGE_H", "ops.session_max_age_h"),
    (
        "PROVISIONER_BILLING_PAST_DUE_GRACE_DAYS",
        "billing.past_due_grace_days",
    ),
];

/// Renamed keys: old dotted name → new one. The old name keeps working (a file
/// written for an older release still starts) and leaves a deprecation note.
const RENAMED: [(&str, &str); 1] = [("http.publish_timeout_ms", "broker.publish_timeout_ms")];

/// The name a setting goes by in errors: its dotted key, plus its environment
/// variable when it has one (`http.listen (PROVISIONER_LISTEN)`).
pub(super) fn setting_name(key: &str) -> String {
    match ENV_KEYS
        .iter()
        .chain(ENV_INTEGER_KEYS.iter())
        .find(|(_, k)| *k == key)
    {
        Some((var, _)) => format!("{key} ({var})"),
        None => key.to_owned(),
    }
}

/// Merges `over` into `base`: tables recurse, except the top-level `plans` and
/// `roles` tables, which `over` replaces whole so a deployment can drop a default plan.
pub(super) fn merge(base: &mut toml::Table, over: toml::Table) {
    merge_at(base, over, 0);
}

fn merge_at(base: &mut toml::Table, over: toml::Table, depth: usize) {
    for (key, value) in over {
        let replace_whole = depth == 0 && (key == "plans" || key == "roles");
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) if !replace_whole => {
                merge_at(b, o, depth + 1)
            }
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// The environment as a TOML layer. A variable that is unset or blank is no
/// override: `CLERK_INSTANCE_ID=` leaves the file's value in place.
pub(super) fn env_layer(env: impl Fn(&str) -> Option<String>) -> toml::Table {
    let mut layer = toml::Table::new();
    for (var, key) in ENV_KEYS {
        if let Some(value) = env(var).filter(|v| !v.trim().is_empty()) {
            insert(&mut layer, key, toml::Value::String(value));
        }
    }
    for (var, key) in ENV_INTEGER_KEYS {
        if let Some(value) = env(var).filter(|v| !v.trim().is_empty()) {
            let value = match value.trim().parse::<i64>() {
                Ok(n) => toml::Value::Integer(n),
                Err(_) => toml::Value::String(value),
            };
            insert(&mut layer, key, value);
        }
    }
    layer
}

/// Moves every deprecated key of `layer` to its new name, unless the layer sets the
/// new name too (then the new one wins), and notes each for the operator.
pub(super) fn rename_deprecated(layer: &mut toml::Table, notes: &mut Vec<String>) {
    for (old, new) in RENAMED {
        let Some(value) = remove(layer, old) else {
            continue;
        };
        if get(layer, new).is_some() {
            notes.push(format!(
                "setting `{old}` is deprecated and ignored: `{new}` is set too"
            ));
        } else {
            insert(layer, new, value);
            notes.push(format!(
                "setting `{old}` is deprecated: rename it to `{new}`"
            ));
        }
    }
}

fn get<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let (parent, leaf) = match key.rsplit_once('.') {
        Some((parent, leaf)) => (parent, leaf),
        None => return table.get(key),
    };
    let mut current = table;
    for part in parent.split('.') {
        current = current.get(part)?.as_table()?;
    }
    current.get(leaf)
}

fn remove(table: &mut toml::Table, key: &str) -> Option<toml::Value> {
    match key.split_once('.') {
        Some((head, rest)) => remove(table.get_mut(head)?.as_table_mut()?, rest),
        None => table.remove(key),
    }
}

fn insert(table: &mut toml::Table, key: &str, value: toml::Value) {
    match key.split_once('.') {
        Some((head, rest)) => {
            let child = table
                .entry(head)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !child.is_table() {
                *child = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(child) = child {
                insert(child, rest, value);
            }
        }
        None => {
            table.insert(key.to_owned(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn tables_merge_key_by_key_but_plans_and_roles_replace_whole() {
        let mut base =
            table("[a]\nx = 1\ny = 2\n[plans.free]\nseats = 1\n[roles]\nr = \"admin\"\n");
        merge(
            &mut base,
            table("[a]\ny = 3\n[plans.solo]\nseats = 2\n[roles]\n"),
        );
        assert_eq!(
            base,
            table("[a]\nx = 1\ny = 3\n[plans.solo]\nseats = 2\n[roles]\n")
        );
    }

    #[test]
    fn blank_variables_are_no_override() {
        let layer = env_layer(|var| match var {
            "PROVISIONER_LISTEN" => Some("0.0.0.0:1".into()),
            "CLERK_INSTANCE_ID" => Some("  ".into()),
            _ => None,
        });
        assert_eq!(layer, table("[http]\nlisten = \"0.0.0.0:1\"\n"));
    }

    #[test]
    fn every_variable_names_a_key_once() {
        let mut keys: Vec<_> = ENV_KEYS
            .iter()
            .chain(ENV_INTEGER_KEYS.iter())
            .map(|(_, k)| *k)
            .collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), ENV_KEYS.len() + ENV_INTEGER_KEYS.len());
        assert_eq!(
            setting_name("http.listen"),
            "http.listen (PROVISIONER_LISTEN)"
        );
        assert_eq!(setting_name("worker.batch_size"), "worker.batch_size");
    }

    #[test]
    fn a_deprecated_key_moves_unless_the_new_one_is_set() {
        let mut notes = Vec::new();
        let mut layer = table("[http]\npublish_timeout_ms = 7\n");
        rename_deprecated(&mut layer, &mut notes);
        assert_eq!(layer, table("[http]\n[broker]\npublish_timeout_ms = 7\n"));
        assert_eq!(notes.len(), 1);

        let mut layer = table("[http]\npublish_timeout_ms = 7\n[broker]\npublish_timeout_ms = 9\n");
        rename_deprecated(&mut layer, &mut notes);
        assert_eq!(layer, table("[http]\n[broker]\npublish_timeout_ms = 9\n"));
        assert!(notes[1].contains("ignored"), "{notes:?}");
    }
}
