-- Every stored field converges, not only the membership set (issue 9 item 3).
--
-- Snapshots of equal version are ordered by the svix id that carried them (the
-- smaller wins), so a tie no longer goes to whichever arrived first: each group of
-- fields that follows a snapshot records the svix id of the one it came from.
-- Null: nothing applied, or written before this migration (such a row loses a tie
-- to any snapshot with a svix id).

-- Svix id of the organization snapshot applied.
alter table workspaces add column source_event text;
-- Svix id of the organization snapshot that set `plan`.
alter table workspaces add column plan_event text;
-- Svix id of the membership snapshot applied.
alter table members add column source_event text;
-- Svix id of the event the display fields came from (a membership snapshot or a
-- user.updated).
alter table members add column profile_event text;
-- Svix id of the user.updated applied.
alter table users add column source_event text;

-- A membership known only from a sparse removal holds no snapshot: versions 0, so
-- any snapshot of it (all older than the removal) fills its fields in, as the
-- in-order history would have stored them.
update members set source_version = 0, profile_version = 0
where clerk_role = '' and removal_reason = 'membership_deleted'
  and joined_at = removed_at and source_version = profile_version
  and source_version = (extract(epoch from removed_at) * 1000)::bigint;
