-- Console sessions end with the token that opened them, and after an absolute
-- lifetime (issue 19, item 10).
--
-- `token_digest` is the SHA-256 of the ops token the session signed in with (never
-- the token): every request refuses, and deletes, a session whose digest is not the
-- digest of a token still configured, so removing a token from
-- PROVISIONER_OPS_TOKENS ends its sessions at their next request. Sessions from
-- before this migration have none and are refused the same way (their operators
-- sign in again). `created_at` bounds a session's life: `[ops] session_max_age_h`.
alter table ops_sessions add column token_digest bytea;
