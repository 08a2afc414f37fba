//! `provisioner load intake` and `provisioner load broker`: the intake benchmark.
//!
//! `intake` sends unique, correctly signed organization events (~1.5 KB) to a running
//! receiver; `broker` publishes the same bodies with the same confirm discipline
//! (persistent, mandatory, one confirm awaited per message) straight to a scratch
//! quorum queue, so the two rates compare intake against the broker alone. Both only
//! ever touch the addresses they are given and the scratch names they create.

/// Size of the events the load tools send, close to a real organization event with
/// a little metadata.
pub const EVENT_SIZE: usize = 1536;

/// A realistic `organization.created` event of exactly `size` bytes (or the smallest
/// possible when `size` is smaller), unique per `(run, seq)`.
pub fn organization_event(run: &str, seq: u64, size: usize) -> Vec<u8> {
    let org = format!("org_load{run}{seq:010}");
    let build = |padding: &str| {
        serde_json::to_vec(&serde_json::json!({
            "data": {
                "object": "organization",
                "id": org,
                "name": format!("Load test {run} #{seq}"),
                "slug": format!("load-{run}-{seq}"),
                "image_url": "https://img.clerk.com/eyJ0eXBlIjoiZGVmYXVsdCJ9",
                "has_image": false,
                "members_count": 1,
                "missing_member_with_elevated_permissions": false,
                "pending_invitations_count": 0,
                "max_allowed_memberships": 25,
                "admin_delete_enabled": true,
                "public_metadata": {"plan": "team", "region": "eu-west-1", "notes": padding},
                "private_metadata": {},
                "created_by": format!("user_load{run}{seq:010}"),
                "created_at": 1_716_883_200_000_i64 + seq as i64,
                "updated_at": 1_716_883_200_000_i64 + seq as i64,
            },
            "event_attributes": {
                "http_request": {
                    "client_ip": "192.168.1.100",
                    "user_agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/128.0.0.0 Safari/537.36"
                }
            },
            "instance_id": "ins_2g7np7Hrk0SN6kj5EDMLDaKNL0S",
            "object": "event",
            "timestamp": 1_716_883_200_000_i64 + seq as i64,
            "type": "organization.created",
        }))
        .expect("a JSON value serializes")
    };
    let base = build("");
    if base.len() >= size {
        return base;
    }
    build(&"x".repeat(size - base.len()))
}
