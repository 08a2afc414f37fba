-- Callmine's record of workspaces (Clerk organizations), their plan, quotas,
-- onboarding, members and audit trail, plus the processing log of webhook events.
--
-- Stable read contract (the main app may read these with SQL, read-only):
--   workspaces, workspace_quotas, onboarding_steps, members, audit_log, events.
-- Internal (may change without notice): users.
--
-- Versions are Clerk timestamps in Unix milliseconds: `data.updated_at` for
-- organizations, memberships and users; the envelope `timestamp` for deletes.
-- An older version never overwrites a newer one, and tombstones are final.

create table workspaces (
    -- Clerk organization id (`org_…`); the workspace id everywhere in Callmine.
    id text primary key,
    -- Null only while the workspace is known from its deletion alone.
    name text,
    slug text,
    image_url text,
    -- Clerk user id of the organization's creator.
    created_by text,
    max_allowed_memberships integer,
    -- `active`, or `deleted` once organization.deleted arrived (a final tombstone).
    status text not null default 'active' check (status in ('active', 'deleted')),
    -- Current plan; a key of `[plans]` in the configuration.
    plan text not null,
    -- `data.updated_at` (ms) of the organization snapshot applied; null until one is.
    source_version bigint,
    -- Envelope timestamp (ms) of the organization.deleted that tombstoned it.
    deleted_version bigint,
    -- `data.created_at` of the organization in Clerk.
    clerk_created_at timestamptz,
    deleted_at timestamptz,
    -- When this service first provisioned the workspace.
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

-- The limits of a workspace, derived from its plan (`[plans.NAME]`).
create table workspace_quotas (
    workspace_id text not null references workspaces (id),
    -- Quota name as configured (`seats`, `analyses_per_month`, …).
    name text not null,
    limit_value bigint not null,
    primary key (workspace_id, name)
);

create table onboarding_steps (
    workspace_id text not null references workspaces (id),
    name text not null,
    -- Order of the step in the onboarding flow (0-based).
    position smallint not null,
    -- A required step cannot be skipped.
    required boolean not null,
    status text not null default 'pending' check (status in ('pending', 'completed', 'skipped')),
    updated_at timestamptz not null default now(),
    primary key (workspace_id, name)
);

-- One row per Clerk organization membership (`orgmem_…`). A user re-added to a
-- workspace gets a new membership id, hence a new row; a removed row is a final
-- tombstone for its membership id.
create table members (
    membership_id text primary key,
    workspace_id text not null references workspaces (id),
    -- Clerk user id (`user_…`).
    user_id text not null,
    -- Callmine role derived from `clerk_role` through `[roles]`.
    role text not null check (role in ('admin', 'member')),
    -- Clerk role key as sent (`org:admin`, `org:member`, custom keys).
    clerk_role text not null,
    -- Display fields: `public_user_data` of the membership, or the user's own
    -- record from user.updated, whichever is newer (see profile_version).
    email text,
    first_name text,
    last_name text,
    image_url text,
    -- `data.updated_at` (ms) of the membership snapshot applied.
    source_version bigint not null,
    -- Version (ms) of the source the display fields came from.
    profile_version bigint not null,
    -- `data.created_at` of the membership in Clerk.
    joined_at timestamptz not null,
    -- Set once the membership ended; never cleared.
    removed_at timestamptz,
    -- Why it ended: `membership_deleted`, `workspace_deleted` or `user_deleted`.
    removal_reason text check (removal_reason in ('membership_deleted', 'workspace_deleted', 'user_deleted')),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create index members_active_by_workspace on members (workspace_id, user_id) where removed_at is null;
create index members_by_user on members (user_id);

-- Clerk users as last seen in user.updated, and tombstones of deleted users.
create table users (
    id text primary key,
    email text,
    first_name text,
    last_name text,
    image_url text,
    -- `data.updated_at` (ms) of the user snapshot applied; null for a tombstone only.
    source_version bigint,
    -- Set by user.deleted; final: the user's memberships never come back.
    deleted_at timestamptz,
    updated_at timestamptz not null default now()
);

create table audit_log (
    id bigserial primary key,
    workspace_id text not null,
    at timestamptz not null default now(),
    -- `workspace.provisioned`, `workspace.renamed`, `workspace.plan_changed`,
    -- `workspace.updated`, `workspace.deleted`, `member.added`,
    -- `member.role_changed`, `member.updated`, `member.removed`,
    -- `onboarding.step_updated`.
    action text not null,
    actor text not null check (actor in ('clerk', 'reconcile', 'replay', 'api')),
    -- What the action is about: a user id, a step name, the workspace id.
    subject text,
    -- Before/after values and context of the change.
    details jsonb not null default '{}',
    -- Svix id of the event that caused it; null for API changes.
    event_id text
);

create index audit_log_by_workspace on audit_log (workspace_id, id desc);

-- The processing log: what happened to each Svix message id.
create table events (
    svix_id text primary key,
    type text not null,
    -- The workspace the event is about, when it names one.
    workspace_id text,
    -- processed: applied; ignored: nothing to do for this service;
    -- superseded: older than the state already applied (or a tombstone);
    -- dead: dead-lettered, see `error`; a replay processes it afresh.
    status text not null check (status in ('processed', 'ignored', 'superseded', 'dead')),
    error text,
    -- Times a worker took the event up (replays of dead events included).
    attempts integer not null default 1,
    -- When intake queued it (AMQP timestamp), or when a worker first saw it.
    received_at timestamptz not null,
    processed_at timestamptz not null default now()
);

create index events_by_processed_at on events (processed_at desc);
create index events_by_workspace on events (workspace_id, processed_at desc);
create index events_by_status on events (status, processed_at desc);
