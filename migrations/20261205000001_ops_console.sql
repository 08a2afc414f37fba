-- The ops console (issue 13): its sessions, and its actions in the audit trail.
--
-- Sessions live here, not in the cookie, so logging out or the idle expiry ends
-- one for good: the cookie holds a random 256-bit id, this table only its SHA-256,
-- so a read of the table does not hand out usable cookies.
create table ops_sessions (
    -- SHA-256 of the session id the cookie carries.
    id_hash bytea primary key,
    -- The CSRF token every form of the session carries (random, one per session).
    csrf text not null,
    -- Who is operating: the login form's label, else `ops token N`; written into the
    -- audit rows and log lines of every action.
    label text not null,
    created_at timestamptz not null default now(),
    -- Bumped on every request; a session idle for 12 h is expired.
    last_seen_at timestamptz not null default now(),
    -- The one-line result of the last action, shown once by the next page (jsonb:
    -- `ok`, `text`, `lines`).
    flash jsonb
);

create index ops_sessions_by_last_seen on ops_sessions (last_seen_at);

-- Console actions are audited with actor `ops` (a replay keeps actor `replay`), and
-- an action on a dead letter that names no workspace (a `user.*` event) still gets
-- its row: `workspace_id` is null there. Rows written by provisioning, reconcile and
-- the read API always name their workspace, as before.
alter table audit_log drop constraint audit_log_actor_check;
alter table audit_log add constraint audit_log_actor_check
    check (actor in ('clerk', 'reconcile', 'replay', 'api', 'ops'));
alter table audit_log alter column workspace_id drop not null;
