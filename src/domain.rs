//! Domain types that more than one layer speaks: the configuration's role map, the
//! provisioning code and the read API all name a member's role with this one [`Role`];
//! provisioning claims, the read API, the CLI and the console name a processing-log
//! status with this one [`EventStatus`].
//!
//! Guarantee: a role or status has exactly one text form (`admin`, `processed`, …), the
//! same in the config file, the database, the JSON and the OpenAPI document, and a
//! stored value outside that set is an error, never a silent default.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A stored value that is not one of the variants the schema allows.
#[derive(Debug, thiserror::Error)]
#[error("unexpected {what} {value:?} in the database")]
pub struct UnknownValue {
    /// Which column.
    pub what: &'static str,
    /// The value found.
    pub value: String,
}

/// An enum of stored and served text values: `ALL`, `as_str`, `parse` and its
/// JSON and OpenAPI forms from one list.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in the order declared.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The value as stored and served.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }

            /// Parses a stored value.
            pub fn parse(value: &str) -> Result<Self, UnknownValue> {
                match value {
                    $($text => Ok(Self::$variant),)+
                    other => Err(UnknownValue { what: $what, value: other.to_owned() }),
                }
            }
        }
    };
}
pub(crate) use text_enum;

text_enum!(
    /// What happened to a webhook event.
    EventStatus, "event status" {
        /// Applied.
        Processed = "processed",
        /// Nothing to do for this service.
        Ignored = "ignored",
        /// Older than the state already applied, or hit a tombstone.
        Superseded = "superseded",
        /// Dead-lettered; see `error`.
        Dead = "dead",
    }
);

/// Callmine role of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// May change onboarding and workspace settings.
    Admin,
    /// Reads the workspace.
    Member,
}

impl Role {
    /// The role's name as stored and served.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    /// Parses a stored value; the match is exact (`Admin` is not a role).
    pub fn parse(value: &str) -> Result<Self, UnknownValue> {
        match value {
            "admin" => Ok(Role::Admin),
            "member" => Ok(Role::Member),
            other => Err(UnknownValue {
                what: "role",
                value: other.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_is_the_same_everywhere() {
        for role in [Role::Admin, Role::Member] {
            assert_eq!(Role::parse(role.as_str()).unwrap(), role);
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{}\"", role.as_str()));
            assert_eq!(serde_json::from_str::<Role>(&json).unwrap(), role);
        }
        assert!(Role::parse("Admin").is_err());
        assert!(serde_json::from_str::<Role>("\"owner\"").is_err());
    }
}
