-- The PostgreSQL-only baseline of issue 3: one Clerk event per transaction, as the
-- worker would apply an organizationMembership.created without batching, on the
-- real schema (`provisioner migrate`). Run by bench/run_e2e.sh:
--   pgbench -n -c 8 -j 2 -T 15 -f bench/pgbench_event.sql
-- after seeding `bench_ws_1` .. `bench_ws_1000` workspaces. Per transaction, the
-- statements the worker issues for such an event:
--   1. the advisory locks on the workspace and the user (one statement),
--   2. the processing-log row claimed together with the workspace/member/user read,
--   3. the member row,
--   4. its audit row,
-- then the commit, whose WAL flush bounds the rate.
\set ws random(1, 1000)
\set u random(1, 2000000000)
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended(k, 0))
  FROM unnest(ARRAY['bench_ws_' || :ws, 'user_' || :u]) AS k;
WITH log AS (
  INSERT INTO events (svix_id, type, workspace_id, status, received_at)
  VALUES ('pgb_' || :client_id || '_' || :u || '_' || txid_current(),
          'organizationMembership.created', 'bench_ws_' || :ws, 'processed', now())
  ON CONFLICT (svix_id) DO NOTHING
  RETURNING 1)
SELECT EXISTS (SELECT 1 FROM log) AS fresh, w.status, w.plan, w.source_version,
       m.membership_id, m.source_version, u.source_version, u.deleted_at
  FROM (SELECT 1) AS one
  LEFT JOIN workspaces w ON w.id = 'bench_ws_' || :ws
  LEFT JOIN members m ON m.membership_id = 'pgb_mem_' || :client_id || '_' || :u
  LEFT JOIN users u ON u.id = 'user_' || :u;
INSERT INTO members (membership_id, workspace_id, user_id, role, clerk_role, email,
                     first_name, last_name, source_version, profile_version, joined_at)
VALUES ('pgb_mem_' || :client_id || '_' || :u || '_' || txid_current(), 'bench_ws_' || :ws,
        'user_' || :u, 'member', 'org:member', 'user' || :u || '@example.com',
        'Bench', 'User', 1700000000000, 1700000000000, now())
ON CONFLICT (membership_id) DO UPDATE
  SET role = excluded.role, clerk_role = excluded.clerk_role, updated_at = now();
INSERT INTO audit_log (workspace_id, action, actor, subject, details, event_id)
VALUES ('bench_ws_' || :ws, 'member.added', 'clerk', 'user_' || :u,
        '{"role": "member", "clerk_role": "org:member"}',
        'pgb_' || :client_id || '_' || :u || '_' || txid_current());
COMMIT;
