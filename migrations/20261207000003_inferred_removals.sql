-- What reconcile removes on inference is not a tombstone (issue 19 items 4 and 5,
-- DESIGN §5 "reconcile proves before it removes").
--
-- A removal applied by reconcile (actor `reconcile`: an organization or membership
-- absent from Clerk's listings) takes access away at once, but is stored apart from
-- Clerk's own deletions: any real deletion (of the membership, its user or its
-- workspace) replaces it whatever the times, and a later snapshot of the
-- membership or organization (a webhook, or a reconcile that lists it) restores it.

-- True while the workspace's deletion is only inferred by reconcile.
alter table workspaces add column deletion_inferred boolean not null default false;

-- `not_in_clerk`: reconcile did not find the membership in Clerk;
-- `workspace_not_in_clerk`: it ended with its workspace's inferred deletion.
alter table members drop constraint members_removal_reason_check;
alter table members add constraint members_removal_reason_check
    check (removal_reason in ('membership_deleted', 'workspace_deleted', 'user_deleted',
                              'not_in_clerk', 'workspace_not_in_clerk'));
