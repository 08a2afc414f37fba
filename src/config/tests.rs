//! The configuration's unit tests: loading, layering, validation and the secrecy
//! of errors and `Debug`.

use super::*;

fn load(file: Option<&str>, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::from_sources(file, |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    })
}

#[test]
fn defaults_load_and_match_the_design() {
    let s = load(None, &[]).unwrap();
    assert_eq!(s.http.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(s.broker.exchange, "clerk.webhooks");
    assert_eq!(s.broker.queue, "provisioner.events");
    assert_eq!(s.broker.dead_letter_exchange, "provisioner.dlx");
    assert_eq!(s.broker.dead_letter_queue, "provisioner.dead");
    assert_eq!(
        s.database.url.expose(),
        "postgres://postgres@127.0.0.1:5432/provisioner"
    );
    assert_eq!(s.environment, Environment::Development);
    assert!(
        s.provisioning
            .plans
            .contains_key(&s.provisioning.default_plan)
    );
}

#[test]
fn amqp_url_takes_the_nodes_of_one_cluster() {
    let urls = "amqp://u:hunter2@r1:5672/prod, amqp://u:hunter2@r2:5672/prod,amqps://u:hunter2@r3:5671/prod?heartbeat=5";
    let s = load(None, &[("AMQP_URL", urls)]).unwrap();
    assert_eq!(s.broker.url.addresses().len(), 3);
    assert_eq!(s.broker.initial_group_size(), Some(3));
    assert!(!format!("{:?} {}", s.broker, s.broker.url).contains("hunter2"));
    let s = load(
        None,
        &[
            ("AMQP_URL", urls),
            ("PROVISIONER_BROKER_QUORUM_INITIAL_GROUP_SIZE", "2"),
        ],
    )
    .unwrap();
    assert_eq!(s.broker.initial_group_size(), Some(2), "the setting wins");
    let four = "amqp://r1/v,amqp://r2/v,amqp://r3/v,amqp://r4/v";
    let s = load(None, &[("AMQP_URL", four)]).unwrap();
    assert_eq!(s.broker.initial_group_size(), Some(3), "up to 3");
    let s = load(None, &[("AMQP_URL", "amqp://u:p@r1/v")]).unwrap();
    assert_eq!(
        s.broker.initial_group_size(),
        None,
        "one address: the broker's default"
    );

    for (other, what) in [
        ("amqp://u:hunter2@r2/staging", "vhost"),
        ("amqp://v:hunter2@r2/prod", "user"),
        ("amqp://u:swordfish@r2/prod", "password"),
        ("http://u:hunter2@r2/prod", "amqp://"),
    ] {
        let value = format!("amqp://u:hunter2@r1/prod,{other}");
        let err = load(None, &[("AMQP_URL", &value)]).unwrap_err();
        let shown = err.to_string();
        assert!(err.setting.contains("broker.url (AMQP_URL)"), "{shown}");
        assert!(shown.contains(what), "{what}: {shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("swordfish"),
            "{shown}"
        );
    }
    let err = load(
        None,
        &[("PROVISIONER_BROKER_QUORUM_INITIAL_GROUP_SIZE", "0")],
    )
    .unwrap_err();
    assert!(
        err.setting.contains("broker.quorum_initial_group_size"),
        "{err}"
    );
}

#[test]
fn environment_overrides_the_file() {
    let s = load(
        None,
        &[
            ("PROVISIONER_LISTEN", "0.0.0.0:9999"),
            (
                "CLERK_WEBHOOK_SECRET",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw, whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            ),
            ("PROVISIONER_API_TOKENS", "a,b"),
            ("CLERK_INSTANCE_ID", "ins_1"),
        ],
    )
    .unwrap();
    assert_eq!(s.http.listen.to_string(), "0.0.0.0:9999");
    assert_eq!(s.clerk.webhook_secrets.len(), 2);
    assert_eq!(s.api.tokens.len(), 2);
    assert_eq!(s.clerk.instance_id.as_deref(), Some("ins_1"));
}

#[test]
fn production_refuses_development_secret_and_token() {
    let err = load(None, &[("PROVISIONER_ENV", "production")]).unwrap_err();
    assert!(err.setting.contains("CLERK_WEBHOOK_SECRET"), "{err}");
    let err = load(
        None,
        &[
            ("PROVISIONER_ENV", "production"),
            (
                "CLERK_WEBHOOK_SECRET",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ),
        ],
    )
    .unwrap_err();
    assert!(err.setting.contains("PROVISIONER_API_TOKENS"), "{err}");
    load(
        None,
        &[
            ("PROVISIONER_ENV", "production"),
            (
                "CLERK_WEBHOOK_SECRET",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ),
            // Production tokens are 32 characters or more (guard.rs).
            (
                "PROVISIONER_API_TOKENS",
                "prod-token-0123456789abcdefghijklm",
            ),
            (
                "PROVISIONER_OPS_TOKENS",
                "prod-ops-token-0123456789abcdefghijklm",
            ),
        ],
    )
    .unwrap();
}

#[test]
fn production_refuses_the_development_ops_token() {
    let production = [
        ("PROVISIONER_ENV", "production"),
        (
            "CLERK_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ),
        ("PROVISIONER_API_TOKENS", "prod-token"),
    ];
    let err = load(None, &production).unwrap_err();
    assert_eq!(err.setting, "ops.tokens (PROVISIONER_OPS_TOKENS)", "{err}");
    assert!(!format!("{err} {err:?}").contains(DEVELOPMENT_OPS_TOKEN));
    // Also among others: rotation must not smuggle it in.
    let mut env = production.to_vec();
    env.push((
        "PROVISIONER_OPS_TOKENS",
        "prod-ops-token, dev-ops-token-callmine-provisioner",
    ));
    let err = load(None, &env).unwrap_err();
    assert_eq!(err.setting, "ops.tokens (PROVISIONER_OPS_TOKENS)", "{err}");
    // Development keeps the default, so the console opens out of the box.
    let s = load(None, &[]).unwrap();
    let tokens: Vec<_> = s.ops.tokens.iter().map(Secret::expose).collect();
    assert_eq!(tokens, [DEVELOPMENT_OPS_TOKEN]);
}

#[test]
fn an_ops_token_may_not_also_be_a_read_api_token() {
    let err = load(
        None,
        &[
            ("PROVISIONER_API_TOKENS", "shared-token, api-only"),
            ("PROVISIONER_OPS_TOKENS", "ops-only,shared-token"),
        ],
    )
    .unwrap_err();
    assert_eq!(err.setting, "ops.tokens (PROVISIONER_OPS_TOKENS)", "{err}");
    assert!(!format!("{err} {err:?}").contains("shared-token"), "{err}");
}

#[test]
fn bad_settings_fail_with_one_line_naming_the_setting() {
    let cases: [(&str, &str, &str); 5] = [
        ("PROVISIONER_LISTEN", "nonsense", "http.listen"),
        ("DATABASE_URL", "mysql://x", "database.url"),
        ("AMQP_URL", "http://x", "broker.url"),
        (
            "CLERK_WEBHOOK_SECRET",
            "not-a-secret",
            "clerk.webhook_secrets",
        ),
        ("LOG_FORMAT", "xml", "log.format"),
    ];
    for (var, value, setting) in cases {
        let err = load(None, &[(var, value)]).unwrap_err();
        assert!(err.setting.starts_with(setting), "{var}: {err}");
        assert!(!err.to_string().contains('\n'));
    }
    let err = load(Some("[provisioning]\ndefault_plan = \"gold\"\n"), &[]).unwrap_err();
    assert_eq!(err.setting, "provisioning.default_plan");
    let err = load(Some("[plans.solo]\nseats = 1\n"), &[]).unwrap_err();
    assert!(err.setting.starts_with("plans.solo."), "{err}");
}

#[test]
fn a_file_merges_over_defaults_and_plans_replace_whole() {
    let file = r#"
[worker]
concurrency = 3
[provisioning]
default_plan = "solo"
[plans.solo]
seats = 1
analyses_per_month = 2
reports = 3
schedules = 4
retention_days = 5
gong_credentials = 6
"#;
    let s = load(Some(file), &[]).unwrap();
    assert_eq!(s.worker.concurrency, 3);
    assert_eq!(s.worker.batch_size, 64);
    assert_eq!(s.provisioning.plans.len(), 1);
    assert_eq!(s.provisioning.plans["solo"]["gong_credentials"], 6);
}

#[test]
fn secrets_never_show_in_debug() {
    let s = load(
        None,
        &[
            ("AMQP_URL", "amqp://user:hunter2@rabbit:5672/%2f"),
            ("DATABASE_URL", "postgres://u:pgpass@db/x"),
        ],
    )
    .unwrap();
    let debug = format!("{s:?}");
    assert!(!debug.contains("hunter2"));
    assert!(!debug.contains("pgpass"));
    assert!(!debug.contains(DEVELOPMENT_WEBHOOK_SECRET));
    assert!(!debug.contains(DEVELOPMENT_API_TOKEN));
    assert!(debug.contains("rabbit"));
}

#[test]
fn roles_map_with_org_admin_always_admin() {
    let file = "[roles]\n\"org:billing\" = \"admin\"\n\"org:admin\" = \"member\"\n";
    let s = load(Some(file), &[]).unwrap();
    assert_eq!(s.provisioning.role_for("org:admin"), Role::Admin);
    assert_eq!(s.provisioning.role_for("org:billing"), Role::Admin);
    assert_eq!(s.provisioning.role_for("org:member"), Role::Member);
    assert_eq!(s.provisioning.role_for("org:whatever"), Role::Member);
}

#[test]
fn every_validation_error_names_its_setting() {
    let cases: &[(&str, &str)] = &[
        ("[http]\nmax_body_bytes = 0", "http.max_body_bytes"),
        (
            "[broker]\npublish_timeout_ms = 0",
            "broker.publish_timeout_ms",
        ),
        (
            "[database]\nmax_connections = 0",
            "database.max_connections",
        ),
        (
            "[database]\nurl = \"mysql://u:pw@db/x\"",
            "database.url (DATABASE_URL)",
        ),
        ("[broker]\nurl = \"http://u:pw@x\"", "broker.url (AMQP_URL)"),
        ("[broker]\nexchange = \" \"", "broker.exchange"),
        ("[broker]\nqueue = \"\"", "broker.queue"),
        (
            "[broker]\ndead_letter_exchange = \"\"",
            "broker.dead_letter_exchange",
        ),
        (
            "[broker]\ndead_letter_queue = \"\"",
            "broker.dead_letter_queue",
        ),
        (
            "[broker]\nretry_queue_prefix = \"\"",
            "broker.retry_queue_prefix",
        ),
        ("[broker]\ndelivery_limit = 0", "broker.delivery_limit"),
        ("[broker]\npublish_channels = 0", "broker.publish_channels"),
        (
            "[broker]\npublish_channels = 1025",
            "broker.publish_channels",
        ),
        (
            "[clerk]\nwebhook_secrets = \" , \"",
            "clerk.webhook_secrets (CLERK_WEBHOOK_SECRET)",
        ),
        (
            "[clerk]\nwebhook_secrets = \"whsec_!!\"",
            "clerk.webhook_secrets (CLERK_WEBHOOK_SECRET)",
        ),
        (
            "[clerk]\napi_url = \"not a url\"",
            "clerk.api_url (CLERK_API_URL)",
        ),
        (
            "[api]\ntokens = \" , \"",
            "api.tokens (PROVISIONER_API_TOKENS)",
        ),
        ("[worker]\nconcurrency = 0", "worker.concurrency"),
        ("[worker]\nbatch_size = 0", "worker.batch_size"),
        (
            "[worker]\nretry_delays_ms = [10, 0]",
            "worker.retry_delays_ms",
        ),
        ("[plans]\n", "plans"),
        ("[plans.free]\nseats = 1", "plans.free.analyses_per_month"),
        (NEGATIVE_QUOTA, "plans.free.seats"),
        (
            "[provisioning]\ndefault_plan = \"gold\"",
            "provisioning.default_plan",
        ),
        (
            "[provisioning]\nonboarding_steps = []",
            "provisioning.onboarding_steps",
        ),
        (
            "[provisioning]\nonboarding_steps = [{ name = \"a\", required = true }, { name = \"a\", required = false }]",
            "provisioning.onboarding_steps",
        ),
        // Rejected while deserializing: named all the same.
        ("environment = \"staging\"", "environment (PROVISIONER_ENV)"),
        (
            "[http]\nlisten = \"nonsense\"",
            "http.listen (PROVISIONER_LISTEN)",
        ),
        ("[log]\nformat = \"xml\"", "log.format (LOG_FORMAT)"),
        ("[worker]\nbatch_size = \"many\"", "worker.batch_size"),
        ("[plans.free]\nseats = \"five\"", "plans.free.seats"),
        ("[roles]\n\"org:x\" = \"owner\"", "roles.org:x"),
    ];
    for (file, setting) in cases {
        let err = load(Some(file), &[]).unwrap_err();
        assert_eq!(err.setting, *setting, "{file}: {err}");
        assert!(!err.to_string().contains('\n'), "{err}");
        assert!(!err.to_string().contains("pw@"), "{err}");
    }
}

const NEGATIVE_QUOTA: &str = "[plans.free]\nseats = -1\nanalyses_per_month = 1\nreports = 1\nschedules = 1\nretention_days = 1\ngong_credentials = 1\n";

#[test]
fn unknown_keys_are_named_and_broken_files_are_quoted_by_line_only() {
    let err = load(Some("colour = \"blue\""), &[]).unwrap_err();
    assert_eq!(err.setting, "colour", "{err}");
    let err = load(Some("[http]\nlisten_on = \"x\""), &[]).unwrap_err();
    assert_eq!(err.setting, "http.listen_on", "{err}");
    // A broken file: one line, the line, column and setting, never the text
    // around it.
    let err = load(Some("[clerk]\nwebhook_secrets = \"whsec_hunter2"), &[]).unwrap_err();
    assert_eq!(err.setting, "PROVISIONER_CONFIG");
    assert!(
        err.message.starts_with(
            "line 2, column 33 (setting clerk.webhook_secrets (CLERK_WEBHOOK_SECRET)): "
        ),
        "{err}"
    );
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!err.to_string().contains('\n'), "{err}");
}

#[test]
fn a_broken_string_is_never_taken_for_a_setting_name() {
    // The error is on the line `hunter2 = x`, inside an unterminated string.
    let text = "[database]\nurl = \"\"\"postgres://u:p@h/db\nhunter2 = \"x";
    let err = load(Some(text), &[]).unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(err.message.starts_with("line "), "{err}");
}

#[test]
fn environment_beats_file_beats_defaults() {
    let file = "[http]\nlisten = \"127.0.0.2:1\"\n[log]\nfilter = \"debug\"\nformat = \"json\"\n";
    let s = load(
        Some(file),
        &[
            ("PROVISIONER_LISTEN", "127.0.0.3:2"),
            ("LOG_FORMAT", "text"),
        ],
    )
    .unwrap();
    assert_eq!(s.http.listen.to_string(), "127.0.0.3:2", "env over file");
    assert_eq!(s.log.format, LogFormat::Text, "env over file");
    assert_eq!(s.log.filter, "debug", "file over default");
    assert_eq!(s.http.max_body_bytes, 1_048_576, "default");
    // A blank variable is no override.
    let s = load(Some(file), &[("PROVISIONER_LISTEN", " ")]).unwrap();
    assert_eq!(s.http.listen.to_string(), "127.0.0.2:1");
    // A bad value names its variable even when the file set it.
    let err = load(Some("[log]\nformat = \"xml\""), &[]).unwrap_err();
    assert!(err.setting.contains("LOG_FORMAT"), "{err}");
}

#[test]
fn every_variable_overrides_its_setting() {
    let s = load(
            None,
            &[
                ("PROVISIONER_ENV", "production"),
                ("PROVISIONER_LISTEN", "0.0.0.0:1"),
                ("DATABASE_URL", "postgres://db/x"),
                ("AMQP_URL", "amqps://rabbit/v"),
                (
                    "CLERK_WEBHOOK_SECRET",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ),
                ("CLERK_INSTANCE_ID", "ins_2"),
                ("CLERK_SECRET_KEY", "sk_test"),
                ("CLERK_API_URL", "http://clerk.local"),
                // Production: tokens of 32 characters or more.
                (
                    "PROVISIONER_API_TOKENS",
                    "t1-0123456789abcdefghijklmnopqrstu, t2-0123456789abcdefghijklmnopqrstu",
                ),
                (
                    "PROVISIONER_OPS_TOKENS",
                    "o1-0123456789abcdefghijklmnopqrstu,o2-0123456789abcdefghijklmnopqrstu ,o3-0123456789abcdefghijklmnopqrstu",
                ),
                ("RUST_LOG", "warn"),
                ("LOG_FORMAT", "json"),
            ],
        )
        .unwrap();
    assert_eq!(s.environment, Environment::Production);
    assert_eq!(s.http.listen.to_string(), "0.0.0.0:1");
    assert_eq!(s.database.url.expose(), "postgres://db/x");
    assert_eq!(s.broker.url.expose(), "amqps://rabbit/v");
    assert_eq!(s.clerk.webhook_secrets.len(), 1);
    assert_eq!(s.clerk.instance_id.as_deref(), Some("ins_2"));
    assert_eq!(
        s.clerk.secret_key.as_ref().map(Secret::expose),
        Some("sk_test")
    );
    assert_eq!(s.clerk.api_url, "http://clerk.local");
    let tokens: Vec<_> = s.api.tokens.iter().map(Secret::expose).collect();
    let long = |t: &str| format!("{t}-0123456789abcdefghijklmnopqrstu");
    assert_eq!(tokens, [long("t1"), long("t2")], "split and trimmed");
    let tokens: Vec<_> = s.ops.tokens.iter().map(Secret::expose).collect();
    assert_eq!(tokens, [long("o1"), long("o2"), long("o3")]);
    assert_eq!(s.log.filter, "warn");
    assert_eq!(s.log.format, LogFormat::Json);
}

#[test]
fn http_limits_come_from_the_file_and_the_environment() {
    let s = load(None, &[]).unwrap();
    assert_eq!(s.http.header_read_timeout_ms, 10_000);
    assert_eq!(s.http.body_read_timeout_ms, 30_000);
    assert_eq!(s.http.idle_timeout_ms, 60_000);
    assert_eq!(s.http.max_connections, 1024);
    assert_eq!(s.http.max_inflight_webhooks, 256);
    let s = load(
        Some("[http]\nmax_connections = 7\nidle_timeout_ms = 9\n"),
        &[
            ("PROVISIONER_HTTP_HEADER_READ_TIMEOUT_MS", "1"),
            ("PROVISIONER_HTTP_BODY_READ_TIMEOUT_MS", "2"),
            ("PROVISIONER_HTTP_IDLE_TIMEOUT_MS", "3"),
            ("PROVISIONER_HTTP_MAX_INFLIGHT_WEBHOOKS", " 5 "),
        ],
    )
    .unwrap();
    assert_eq!(
        (
            s.http.header_read_timeout_ms,
            s.http.body_read_timeout_ms,
            s.http.idle_timeout_ms,
            s.http.max_connections,
            s.http.max_inflight_webhooks
        ),
        (1, 2, 3, 7, 5)
    );
    let err = load(None, &[("PROVISIONER_HTTP_MAX_CONNECTIONS", "many")]).unwrap_err();
    assert_eq!(
        err.setting, "http.max_connections (PROVISIONER_HTTP_MAX_CONNECTIONS)",
        "{err}"
    );
    let err = load(None, &[("PROVISIONER_HTTP_IDLE_TIMEOUT_MS", "0")]).unwrap_err();
    assert_eq!(
        err.setting, "http.idle_timeout_ms (PROVISIONER_HTTP_IDLE_TIMEOUT_MS)",
        "{err}"
    );
}

/// The webhook body deadline and the connection age default to 5 s and 5 min,
/// come from the file and from their variables, and only the age may be 0.
#[test]
fn webhook_body_timeout_and_connection_age_come_from_file_and_environment() {
    let s = load(None, &[]).unwrap();
    assert_eq!(s.http.webhook_body_timeout_ms, 5_000);
    assert_eq!(s.http.max_connection_age_ms, 300_000);
    let s = load(
        Some("[http]\nwebhook_body_timeout_ms = 7\nmax_connection_age_ms = 8\n"),
        &[],
    )
    .unwrap();
    assert_eq!(
        (s.http.webhook_body_timeout_ms, s.http.max_connection_age_ms),
        (7, 8)
    );
    let s = load(
        None,
        &[
            ("PROVISIONER_HTTP_WEBHOOK_BODY_TIMEOUT_MS", "9"),
            ("PROVISIONER_HTTP_MAX_CONNECTION_AGE_MS", "0"),
        ],
    )
    .unwrap();
    assert_eq!(
        (s.http.webhook_body_timeout_ms, s.http.max_connection_age_ms),
        (9, 0),
        "an age of 0 turns the limit off"
    );
    let err = load(None, &[("PROVISIONER_HTTP_WEBHOOK_BODY_TIMEOUT_MS", "0")]).unwrap_err();
    assert_eq!(
        err.setting, "http.webhook_body_timeout_ms (PROVISIONER_HTTP_WEBHOOK_BODY_TIMEOUT_MS)",
        "{err}"
    );
    let err = load(None, &[("PROVISIONER_HTTP_MAX_CONNECTION_AGE_MS", "soon")]).unwrap_err();
    assert_eq!(
        err.setting, "http.max_connection_age_ms (PROVISIONER_HTTP_MAX_CONNECTION_AGE_MS)",
        "{err}"
    );
}

#[test]
fn the_deprecated_publish_timeout_name_still_works_and_leaves_a_note() {
    let s = load(None, &[]).unwrap();
    assert_eq!(s.broker.publish_timeout_ms, 5000);
    assert!(s.deprecations.is_empty(), "{:?}", s.deprecations);

    let s = load(Some("[http]\npublish_timeout_ms = 1000\n"), &[]).unwrap();
    assert_eq!(s.broker.publish_timeout_ms, 1000);
    assert_eq!(s.deprecations.len(), 1);
    assert!(s.deprecations[0].contains("http.publish_timeout_ms"));
    assert!(s.deprecations[0].contains("broker.publish_timeout_ms"));

    let both = "[http]\npublish_timeout_ms = 1000\n[broker]\npublish_timeout_ms = 2000\n";
    let s = load(Some(both), &[]).unwrap();
    assert_eq!(s.broker.publish_timeout_ms, 2000, "the new name wins");
    assert_eq!(s.deprecations.len(), 1);

    let err = load(Some("[http]\npublish_timeout_ms = 0\n"), &[]).unwrap_err();
    assert_eq!(err.setting, "broker.publish_timeout_ms");
}

#[test]
fn secrets_stay_out_of_debug_and_errors() {
    let s = load(
        None,
        &[
            ("CLERK_SECRET_KEY", "sk_live_hunter3"),
            ("PROVISIONER_API_TOKENS", "tok_hunter4"),
            ("PROVISIONER_OPS_TOKENS", "tok_hunter6"),
        ],
    )
    .unwrap();
    let debug = format!("{s:?}");
    assert!(
        !debug.contains("hunter3") && !debug.contains("hunter4") && !debug.contains("hunter6"),
        "{debug}"
    );
    for (var, value) in [
        ("DATABASE_URL", "mysql://u:hunter5@db/x"),
        ("AMQP_URL", "http://u:hunter5@rabbit"),
        ("CLERK_WEBHOOK_SECRET", "whsec_hunter5!"),
    ] {
        let err = load(None, &[(var, value)]).unwrap_err();
        assert!(
            !format!("{err} {err:?}").contains("hunter5"),
            "{var}: {err}"
        );
    }
}
