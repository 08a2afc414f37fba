-- A membership removal is recorded by its id whatever else is known (issue 19 item 1).
--
-- `organizationMembership.deleted` may carry only the membership id, the
-- organization id and the envelope timestamp, and may arrive before its
-- membership, its workspace or both. Until now such a removal stored nothing
-- when the workspace or the user was unknown, and the late `created` made the
-- user an active member again. Every real removal (from Clerk, or a replay of
-- one) is now kept here, and every snapshot of the membership consults it, so a
-- late `created`/`updated` lands as a removed row. Internal: read members.

create table membership_removals (
    membership_id text primary key,
    -- The organization the removal names; no foreign key: the workspace may be
    -- unknown here when the removal arrives (and may never be known).
    workspace_id text not null,
    -- `public_user_data.user_id` when any removal of the membership names it (the
    -- smallest, should two disagree); null while none did.
    user_id text,
    -- Envelope timestamp of the earliest removal received.
    removed_at timestamptz not null
);

-- What the members table already knows.
insert into membership_removals (membership_id, workspace_id, user_id, removed_at)
select membership_id, workspace_id, user_id, removed_at
from members
where removal_reason = 'membership_deleted';

-- A membership known only from a removal that names its user is stored as a
-- removed row at once (so it hides an older row of the same user, DESIGN §5
-- "membership is decided by the newest row"), whether or not its workspace is
-- known yet; such a row may name a workspace not (yet) in `workspaces`. The
-- read side never shows it: `active_members` joins the active workspaces.
alter table members drop constraint members_workspace_id_fkey;
