//! The checks that keep secrets secret and production honest: the length of
//! production tokens, the console's session lifetime, a `CLERK_API_URL` without
//! credentials, and load errors that never quote a secret's value.
//!
//! Guarantee: a [`super::Settings`] in production holds no API or ops token shorter
//! than [`MIN_PRODUCTION_TOKEN_CHARS`]; no load error about a secret setting shows
//! the value it was given, whatever its type; and `clerk.api_url` never carries a
//! password (user-info or a secret query parameter), so no error or log line that
//! quotes the Backend API's address can leak one.

use super::{ConfigError, Environment, Secret, Settings, redact_url, secret::is_secret_parameter};

/// The shortest API or ops token production accepts (characters). A console
/// token is guessed online and a read-API token anywhere the API is reachable;
/// 32 random characters put both out of reach, whatever the throttling.
pub const MIN_PRODUCTION_TOKEN_CHARS: usize = 32;

/// The longest `[ops] session_max_age_h` accepted (a year): an absolute lifetime
/// is the point of the setting, and the database computes it as an interval.
pub const MAX_SESSION_AGE_H: u64 = 24 * 365;

/// Settings whose values are secrets, or URLs that may carry one: a load error
/// about one of them says what is wrong, never what was written.
pub const SECRET_KEYS: [&str; 7] = [
    "database.url",
    "broker.url",
    "clerk.webhook_secrets",
    "clerk.secret_key",
    "clerk.api_url",
    "api.tokens",
    "ops.tokens",
];

/// The message of a deserialization error about `key`. serde quotes the value it
/// refused (`invalid type: integer `982451653`, expected a string`), so for a
/// secret setting the message is replaced whole: a token written as a number is
/// still the token. The same holds for the table that holds one, written as a
/// value by mistake.
pub(super) fn deserialize_message(key: &str, message: String) -> String {
    // A table written as a value (`api = "…"`) is refused with that value too.
    let holds_secret = SECRET_KEYS.iter().any(|s| {
        *s == key
            || s.strip_prefix(key)
                .is_some_and(|rest| rest.starts_with('.'))
    });
    if holds_secret {
        "must be a string (the value is a secret and is not shown)".to_owned()
    } else {
        message
    }
}

/// `[ops]` beyond its tokens: a session lifetime the database can compute.
pub(super) fn ops(settings: &Settings) -> Result<(), ConfigError> {
    let hours = settings.ops.session_max_age_h;
    if !(1..=MAX_SESSION_AGE_H).contains(&hours) {
        return Err(ConfigError::at(
            "ops.session_max_age_h",
            format!("must be between 1 and {MAX_SESSION_AGE_H} hours"),
        ));
    }
    Ok(())
}

/// `clerk.api_url`: a URL without credentials. The Backend API authenticates with
/// `CLERK_SECRET_KEY` alone, so user-info or a `?password=` there is a mistake, and
/// every error about Clerk quotes this address: it is refused, shown redacted.
pub(super) fn clerk_api_url(raw: &str) -> Result<(), ConfigError> {
    const KEY: &str = "clerk.api_url";
    let Ok(url) = url::Url::parse(raw) else {
        return Err(ConfigError::at(
            KEY,
            format!("`{}` is not a URL", redact_url(raw)),
        ));
    };
    let secret_parameter = url.query_pairs().any(|(k, _)| is_secret_parameter(&k));
    if !url.username().is_empty() || url.password().is_some() || secret_parameter {
        // A user name alone may be a token too (`https://sk_live_…@host`): the
        // address is shown without any user-info, and redacted beyond that.
        let mut shown = url.clone();
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        return Err(ConfigError::at(
            KEY,
            format!(
                "`{}` carries credentials (user-info or a password parameter); the Backend API takes only CLERK_SECRET_KEY",
                redact_url(shown.as_str())
            ),
        ));
    }
    Ok(())
}

/// In production, every API and ops token is at least
/// [`MIN_PRODUCTION_TOKEN_CHARS`] long. Only the token's position is named, never
/// the token or its length.
pub(super) fn production_tokens(settings: &Settings) -> Result<(), ConfigError> {
    if settings.environment != Environment::Production {
        return Ok(());
    }
    let lists: [(&str, &[Secret]); 2] = [
        ("api.tokens", &settings.api.tokens),
        ("ops.tokens", &settings.ops.tokens),
    ];
    for (key, tokens) in lists {
        if let Some(i) = tokens
            .iter()
            .position(|t| t.expose().chars().count() < MIN_PRODUCTION_TOKEN_CHARS)
        {
            return Err(ConfigError::at(
                key,
                format!(
                    "token #{} is shorter than {MIN_PRODUCTION_TOKEN_CHARS} characters, refused when PROVISIONER_ENV=production (use a long random token, e.g. `openssl rand -base64 32`)",
                    i + 1
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

    fn load(file: Option<&str>, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::from_sources(file, |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    const PRODUCTION: [(&str, &str); 2] = [
        ("PROVISIONER_ENV", "production"),
        (
            "CLERK_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ),
    ];
    const LONG_API: &str = "api-0123456789abcdefghijklmnopqrstu";
    const LONG_OPS: &str = "ops-0123456789abcdefghijklmnopqrstu";

    fn production(api: &str, ops: &str) -> Result<Settings, ConfigError> {
        let mut env = PRODUCTION.to_vec();
        env.extend([
            ("PROVISIONER_API_TOKENS", api),
            ("PROVISIONER_OPS_TOKENS", ops),
        ]);
        load(None, &env)
    }

    /// Production refuses an API or ops token under 32 characters (any of a
    /// rotation's), naming the setting and neither the token nor its length.
    #[test]
    fn production_refuses_short_tokens_naming_the_setting() {
        let short = "s".repeat(MIN_PRODUCTION_TOKEN_CHARS - 1);
        let exact = "e".repeat(MIN_PRODUCTION_TOKEN_CHARS);
        production(&exact, LONG_OPS).expect("32 characters are enough");
        for (api, ops, setting) in [
            (
                short.as_str(),
                LONG_OPS,
                "api.tokens (PROVISIONER_API_TOKENS)",
            ),
            (
                LONG_API,
                short.as_str(),
                "ops.tokens (PROVISIONER_OPS_TOKENS)",
            ),
            (
                &format!("{LONG_API},{short}") as &str,
                LONG_OPS,
                "api.tokens (PROVISIONER_API_TOKENS)",
            ),
            (
                LONG_API,
                &format!("{LONG_OPS}, {short}"),
                "ops.tokens (PROVISIONER_OPS_TOKENS)",
            ),
        ] {
            let err = production(api, ops).unwrap_err();
            assert_eq!(err.setting, setting, "{err}");
            let shown = format!("{err} {err:?}");
            assert!(shown.contains("32 characters"), "{shown}");
            assert!(!shown.contains(&short), "{shown}");
            assert!(!shown.contains("31"), "no length: {shown}");
        }
        // Characters, not bytes: 31 two-byte characters are still too short.
        let err = production(&"é".repeat(31), LONG_OPS).unwrap_err();
        assert_eq!(err.setting, "api.tokens (PROVISIONER_API_TOKENS)");
        // Development keeps short tokens (tests, a laptop).
        load(
            None,
            &[
                ("PROVISIONER_API_TOKENS", "a"),
                ("PROVISIONER_OPS_TOKENS", "b"),
            ],
        )
        .unwrap();
    }

    /// A secret setting given a number, a float, a list of numbers or a table
    /// written as a value fails naming the setting and never quoting the value.
    #[test]
    fn a_secret_of_the_wrong_type_is_never_quoted() {
        for key in SECRET_KEYS {
            let (table, leaf) = key.split_once('.').unwrap();
            for value in ["982451653", "98245.1653", "[982451653]"] {
                let file = format!("[{table}]\n{leaf} = {value}\n");
                let err = load(Some(&file), &[]).unwrap_err();
                assert!(err.setting.starts_with(key), "{file}: {err}");
                let shown = format!("{err} {err:?}");
                assert!(!shown.contains("982451653"), "{file}: {shown}");
                assert!(!shown.contains("98245"), "{file}: {shown}");
            }
            let file = format!("{table} = \"tok_hunter7\"\n");
            let err = load(Some(&file), &[]).unwrap_err();
            assert!(
                !format!("{err} {err:?}").contains("hunter7"),
                "{file}: {err}"
            );
        }
        // The exact form of the issue.
        let err = load(Some("[api]\ntokens = 982451653\n"), &[]).unwrap_err();
        assert_eq!(err.setting, "api.tokens (PROVISIONER_API_TOKENS)");
        assert!(!err.to_string().contains("982451653"), "{err}");
        // Other settings still quote what they refused: it is no secret and helps.
        let err = load(Some("[worker]\nbatch_size = \"many\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("many"), "{err}");
    }

    /// `CLERK_API_URL` with user-info or a password parameter is refused, and
    /// neither that nor an unparsable value is ever quoted unredacted.
    #[test]
    fn a_clerk_api_url_with_credentials_is_refused_redacted() {
        for raw in [
            "https://user:hunter8@api.clerk.com",
            "https://hunter8@api.clerk.com",
            "https://api.clerk.com/?password=hunter8",
            "https://api.clerk.com/?auth_token=hunter8&x=1",
            "not a url hunter8",
            "http://u:hunter8@[::1",
        ] {
            let err = load(None, &[("CLERK_API_URL", raw)]).unwrap_err();
            assert_eq!(err.setting, "clerk.api_url (CLERK_API_URL)", "{raw}: {err}");
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("hunter8"), "{raw}: {shown}");
        }
        let err = load(None, &[("CLERK_API_URL", "https://u:hunter8@clerk.local")]).unwrap_err();
        assert!(err.to_string().contains("credentials"), "{err}");
        let s = load(
            None,
            &[("CLERK_API_URL", "http://127.0.0.1:9/clerk?region=eu")],
        )
        .unwrap();
        assert_eq!(s.clerk.api_url, "http://127.0.0.1:9/clerk?region=eu");
    }

    /// `[ops] session_max_age_h`: 12 by default, set by the file or
    /// `PROVISIONER_OPS_SESSION_MAX_AGE_H`, and between 1 hour and a year.
    #[test]
    fn the_session_max_age_is_a_setting_with_bounds() {
        assert_eq!(load(None, &[]).unwrap().ops.session_max_age_h, 12);
        let file = "[ops]\nsession_max_age_h = 4\n";
        assert_eq!(load(Some(file), &[]).unwrap().ops.session_max_age_h, 4);
        let s = load(Some(file), &[("PROVISIONER_OPS_SESSION_MAX_AGE_H", "2")]).unwrap();
        assert_eq!(s.ops.session_max_age_h, 2, "env over file");
        for bad in ["0", "8761", "soon"] {
            let err = load(None, &[("PROVISIONER_OPS_SESSION_MAX_AGE_H", bad)]).unwrap_err();
            assert_eq!(
                err.setting, "ops.session_max_age_h (PROVISIONER_OPS_SESSION_MAX_AGE_H)",
                "{bad}: {err}"
            );
        }
    }
}
