-- The version of the organization snapshot that set a workspace's plan.
--
-- A snapshot naming an unknown plan keeps the current plan (issue 9 item 4), so the
-- plan follows the newest snapshot that names a configured plan or none, which is
-- not always the newest snapshot applied: it needs its own version to converge
-- whatever the delivery order. Null while no such snapshot was applied.
alter table workspaces add column plan_version bigint;

update workspaces set plan_version = source_version;
