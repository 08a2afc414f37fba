-- Clerk Billing (issue 22, DESIGN §5b): the subscriptions and subscription items of
-- organization payers, as Clerk last described them.
--
-- Keyed by organization id with no foreign key to workspaces: billing may arrive
-- before its organization and is kept until the workspace is provisioned; it
-- never creates or revives a workspace. Each row keeps the snapshot that beats
-- every other (newest `version` = Clerk's `updated_at` in ms, then the smaller
-- svix id), so duplicates and any arrival order converge.

create table billing_subscriptions (
    id text primary key,                      -- csub_…
    organization_id text not null,
    status text not null,                     -- as sent by Clerk, unknown ones included
    past_due_at timestamptz,
    version bigint not null,                  -- the subscription's updated_at (ms)
    source_event text not null,               -- svix id of the snapshot kept
    updated_at timestamptz not null default now()
);
create index billing_subscriptions_organization on billing_subscriptions (organization_id);

create table billing_items (
    id text primary key,                      -- csub_item_…
    organization_id text not null,
    subscription_id text,
    status text not null,                     -- as sent; an unknown status is never current
    plan_slug text,
    is_free_trial boolean not null,
    period_start timestamptz,
    period_end timestamptz,                   -- null for the free default plan
    canceled_at timestamptz,
    past_due_at timestamptz,
    ended_at timestamptz,
    -- false: not a seat-based plan (the plan's quota stands); true with seats null:
    -- unlimited; true with a number: that many seats.
    seat_based boolean not null,
    seats bigint,
    version bigint not null,                  -- the item's updated_at (ms)
    source_event text not null,
    updated_at timestamptz not null default now(),
    check (seat_based or seats is null)
);
create index billing_items_organization on billing_items (organization_id);
