-- Membership is decided by the newest row (issue 9 item 1).
--
-- A user's standing in a workspace is their newest membership row there, removed
-- rows included: a delayed deletion of an older membership id must never let that
-- older row speak again once a newer membership of the user was removed.
-- `member_standing` and `active_members` say it once, for the read API and for SQL
-- readers (docs/schema.md).

-- Every row of a (workspace, user), removed ones included, for the standing lookup.
create index members_by_workspace_user on members (workspace_id, user_id, joined_at);

-- The standing of each user in each workspace: the newest of their membership rows
-- there, removed ones included. Newest = latest `joined_at` (Clerk's created_at of
-- the membership; a user holds at most one membership of an organization at a
-- time, so a later membership began after every earlier one ended); on equal
-- times a removed row before an active one, then the greater membership id.
create view member_standing as
select m.*
from members m
where not exists (
    select 1 from members n
    where n.workspace_id = m.workspace_id and n.user_id = m.user_id
      and (n.joined_at, n.removed_at is not null, n.membership_id collate "C")
        > (m.joined_at, m.removed_at is not null, m.membership_id collate "C"));

-- Active members: users whose standing row is not removed, in active workspaces;
-- one row per (workspace, user).
create view active_members as
select s.*
from member_standing s
join workspaces w on w.id = s.workspace_id
where s.removed_at is null and w.status = 'active';
