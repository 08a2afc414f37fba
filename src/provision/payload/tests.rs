//! The payload decoder's unit tests: the fixtures, tolerated and refused fields,
//! and timestamps.

use super::*;
use serde_json::json;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

// Every handled fixture decodes, with the facts the provisioner needs.
#[test]
fn fixtures_decode() {
    let d = decode("organization.created", &fixture("organization.created")).unwrap();
    let Event::OrganizationUpsert(o) = d.event else {
        panic!("wrong event")
    };
    assert_eq!(o.id, "org_2g7np7Hrk0SN6kj5EDMLDaKNL0S");
    assert_eq!(o.name, "Acme Corp");
    assert_eq!(o.max_allowed_memberships, Some(5));
    let d = decode("", &fixture("organizationMembership.deleted")).unwrap();
    let Event::MembershipDeleted { removal, at_ms } = d.event else {
        panic!("wrong event")
    };
    assert_eq!(at_ms, 1716883600000);
    assert!(removal.snapshot.is_some());
    let d = decode("user.updated", &fixture("user.updated")).unwrap();
    let Event::UserUpdated(u) = d.event else {
        panic!("wrong event")
    };
    assert_eq!(u.email.as_deref(), Some("john.doe@acme.com"));
    assert_eq!(u.updated_at, 1716883500000);
    let d = decode("user.deleted", &fixture("user.deleted")).unwrap();
    assert!(matches!(d.event, Event::UserDeleted { .. }));
    let d = decode("", &fixture("organizationInvitation.created")).unwrap();
    assert_eq!(d.event, Event::Unhandled);
}

// Nullable and optional fields (per the Clerk reference) may be null or absent,
// and unknown fields are ignored.
#[test]
fn nullable_fields_and_unknown_fields() {
    let body = br#"{"type":"organizationMembership.updated","timestamp":1716883500000,
            "brand_new_top_level":{"x":1},
            "data":{"id":"orgmem_1","role":"org:member","created_at":1,"updated_at":2,
              "unknown":[1,2,3],
              "organization":{"id":"org_1","name":"Acme","slug":null,"public_metadata":null,
                "created_at":1,"updated_at":2},
              "public_user_data":{"user_id":"user_1","first_name":null,"last_name":null,
                "identifier":null}}}"#;
    let d = decode("organizationMembership.updated", body).unwrap();
    let Event::MembershipUpsert(m) = d.event else {
        panic!("wrong event")
    };
    assert_eq!(m.organization.slug, None);
    assert_eq!(m.organization.requested_plan, None);
    assert_eq!(m.organization.image_url, None);
    assert_eq!(m.user.identifier, None);
    assert_eq!(m.user.first_name, None);
    assert_eq!(d.timestamp_ms, Some(1716883500000));
}

// A timestamp in seconds (Clerk's OpenAPI examples) is read as ms.
#[test]
fn seconds_timestamp_is_scaled() {
    let body = br#"{"type":"user.deleted","timestamp":1716883200,"data":{"id":"user_1"}}"#;
    let d = decode("user.deleted", body).unwrap();
    assert_eq!(d.timestamp_ms, Some(1716883200000));
}

// Errors name the field and the problem.
#[test]
fn errors_name_the_field() {
    let e = decode(
        "user.deleted",
        br#"{"type":"user.deleted","data":{"id":"u"}}"#,
    );
    assert_eq!(e.unwrap_err().0, "timestamp: missing");
    let e = decode(
            "organization.updated",
            br#"{"type":"organization.updated","data":{"id":"o","name":"n","created_at":"x","updated_at":1}}"#,
        );
    assert_eq!(
        e.unwrap_err().0,
        "data.created_at: expected an integer, got a string"
    );
    let e = decode("user.updated", br#"{"type":"user.deleted","data":{}}"#);
    assert!(e.unwrap_err().0.contains("does not match"));
}

fn removal_of(body: &[u8]) -> Removal {
    let d = decode("organizationMembership.deleted", body).unwrap();
    let Event::MembershipDeleted { removal, at_ms } = d.event else {
        panic!("wrong event")
    };
    assert_eq!(at_ms, 1716883600000);
    removal
}

// A removal without public_user_data still decodes: ids only, no snapshot.
#[test]
fn removal_without_public_user_data_decodes() {
    let r = removal_of(
        br#"{"type":"organizationMembership.deleted","timestamp":1716883600000,
            "data":{"id":"orgmem_1","role":"org:member","created_at":1,"updated_at":2,
              "organization":{"id":"org_1","name":"Acme","created_at":1,"updated_at":2}}}"#,
    );
    assert_eq!(r.id, "orgmem_1");
    assert_eq!(r.organization_id, "org_1");
    assert_eq!(r.user_id, None);
    assert_eq!(r.snapshot, None);
}

// A removal whose organization is just `{id}` decodes with its user id.
#[test]
fn removal_with_minimal_organization_decodes() {
    let r = removal_of(
        br#"{"type":"organizationMembership.deleted","timestamp":1716883600000,
            "data":{"id":"orgmem_1","organization":{"id":"org_1"},
              "public_user_data":{"user_id":"user_1"}}}"#,
    );
    assert_eq!(r.organization_id, "org_1");
    assert_eq!(r.user_id.as_deref(), Some("user_1"));
    assert_eq!(r.snapshot, None);
}

// Unknown fields, and flat `organization_id`/`user_id`, are accepted.
#[test]
fn removal_with_flat_ids_and_unknown_fields_decodes() {
    let r = removal_of(
        br#"{"type":"organizationMembership.deleted","timestamp":1716883600000,
            "data":{"id":"orgmem_1","organization_id":"org_1","user_id":"user_1",
              "deleted":true,"object":"organization_membership","brand_new":{"x":[1]}}}"#,
    );
    assert_eq!(r.organization_id, "org_1");
    assert_eq!(r.user_id.as_deref(), Some("user_1"));
}

// A removal still needs its membership id, organization id and timestamp.
#[test]
fn removal_needs_its_ids_and_timestamp() {
    let e = decode(
        "",
        br#"{"type":"organizationMembership.deleted","timestamp":1716883600000,
            "data":{"id":"orgmem_1","organization":{"name":"Acme"}}}"#,
    );
    assert_eq!(e.unwrap_err().0, "data.organization.id: missing");
    let e = decode(
        "",
        br#"{"type":"organizationMembership.deleted","timestamp":1716883600000,
            "data":{"organization":{"id":"org_1"}}}"#,
    );
    assert_eq!(e.unwrap_err().0, "data.id: missing");
    let e = decode(
            "",
            br#"{"type":"organizationMembership.deleted","data":{"id":"orgmem_1","organization":{"id":"org_1"}}}"#,
        );
    assert_eq!(e.unwrap_err().0, "timestamp: missing");
}

// organization.deleted and user.deleted need only `{id}` (plus the timestamp);
// other fields, known or not, are ignored.
#[test]
fn deletions_need_only_an_id() {
    let d = decode(
        "",
        br#"{"type":"organization.deleted","timestamp":1716883600000,
            "data":{"id":"org_1","deleted":true,"object":"organization","slug":7,"x":{}}}"#,
    )
    .unwrap();
    assert!(matches!(d.event, Event::OrganizationDeleted { ref id, .. } if id == "org_1"));
    let d = decode(
        "",
        br#"{"type":"user.deleted","timestamp":1716883600000,
            "data":{"id":"user_1","deleted":true,"email_addresses":"x"}}"#,
    )
    .unwrap();
    assert!(matches!(d.event, Event::UserDeleted { ref id, .. } if id == "user_1"));
}

/// A fixture with its payer made an organization (Clerk's examples are user payers).
fn org_paid(name: &str, org: &str) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&fixture(name)).unwrap();
    v["data"]["payer"]["organization_id"] = Value::String(org.to_owned());
    serde_json::to_vec(&v).unwrap()
}

// Clerk's billing examples are user payers: every one decodes, and is ignored.
#[test]
fn billing_fixtures_of_user_payers_are_unhandled() {
    for name in [
        "subscription.created",
        "subscription.updated",
        "subscription.active",
        "subscription.pastDue",
        "subscriptionItem.updated",
        "subscriptionItem.active",
        "subscriptionItem.canceled",
        "subscriptionItem.upcoming",
        "subscriptionItem.ended",
        "subscriptionItem.abandoned",
        "subscriptionItem.incomplete",
        "subscriptionItem.pastDue",
        "subscriptionItem.freeTrialEnding",
    ] {
        let d = decode(name, &fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(d.event, Event::Unhandled, "{name}");
        assert_eq!(d.workspace_id(), None, "{name}");
        // Seconds in the envelope are normalised to ms.
        assert_eq!(d.timestamp_ms, Some(1_716_883_200_000), "{name}");
    }
}

#[test]
fn subscription_of_an_organization_decodes_with_its_items() {
    let d = decode(
        "subscription.created",
        &org_paid("subscription.created", "org_1"),
    )
    .unwrap();
    assert_eq!(d.workspace_id(), Some("org_1"));
    let Event::Billing(b) = d.event else {
        panic!("wrong event")
    };
    let sub = b.subscription.unwrap();
    assert_eq!(sub.id, "csub_2g7np7Hrk0SN6kj5EDMLDaKNL0S");
    assert_eq!(sub.status, "active");
    assert_eq!(sub.updated_at, 1716883200000);
    assert_eq!(b.items.len(), 1);
    let item = &b.items[0];
    assert_eq!(item.id, "csub_item_2g7np7Hrk0SN6kj5EDMLDaKNL0S");
    assert_eq!(item.subscription_id.as_deref(), Some(sub.id.as_str()));
    assert_eq!(item.plan_slug.as_deref(), Some("pro-plan"));
    assert_eq!(item.seats, Seats::Limited(5));
    assert_eq!(item.period_end, Some(1719561600000));
    let d = decode("", &org_paid("subscription.pastDue", "org_1")).unwrap();
    let Event::Billing(b) = d.event else {
        panic!("wrong event")
    };
    assert_eq!(b.subscription.unwrap().past_due_at, Some(1716969600000));
    assert_eq!(b.items[0].seats, Seats::NotSeatBased);
}

#[test]
fn subscription_item_of_an_organization_decodes() {
    let d = decode("", &org_paid("subscriptionItem.freeTrialEnding", "org_1")).unwrap();
    let Event::Billing(b) = d.event else {
        panic!("wrong event")
    };
    assert_eq!(b.organization_id, "org_1");
    assert_eq!(b.subscription, None);
    let item = &b.items[0];
    assert!(item.is_free_trial);
    assert_eq!(item.status, "active");
    assert_eq!(item.plan_slug.as_deref(), Some("premium-trial"));
    assert_eq!(
        item.subscription_id.as_deref(),
        Some("csub_2g7np7Hrk0SN6kj5EDMLDaKNL0S")
    );
}

// Beta vocabulary: unknown statuses and fields, malformed optional fields and
// unlimited seats never fail an event; only ids and versions are required.
#[test]
fn billing_decodes_leniently() {
    let mut v: Value =
        serde_json::from_slice(&org_paid("subscriptionItem.updated", "org_1")).unwrap();
    v["data"]["status"] = json!("paused_by_aliens");
    v["data"]["brand_new_field"] = json!({"x": 1});
    v["data"]["period_end"] = json!("soon");
    v["data"]["is_free_trial"] = json!("no");
    v["data"]["plan"] = Value::Null;
    v["data"]["seats"] = json!({"quantity": null});
    let d = decode("", &serde_json::to_vec(&v).unwrap()).unwrap();
    let Event::Billing(b) = d.event else {
        panic!("wrong event")
    };
    let item = &b.items[0];
    assert_eq!(item.status, "paused_by_aliens");
    assert_eq!(item.period_end, None);
    assert!(!item.is_free_trial);
    assert_eq!(item.plan_slug, None);
    assert_eq!(item.seats, Seats::Unlimited);

    v["data"]["status"] = Value::Null;
    let d = decode("", &serde_json::to_vec(&v).unwrap()).unwrap();
    let Event::Billing(b) = d.event else {
        panic!("wrong event")
    };
    assert_eq!(b.items[0].status, "unknown");

    v["data"].as_object_mut().unwrap().remove("updated_at");
    let u = read("", &serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert_eq!(u.error.0, "data.updated_at: missing");
    assert_eq!(u.workspace_id.as_deref(), Some("org_1"));
}

#[test]
fn subscription_items_listed_twice_keep_the_newest() {
    let mut v: Value = serde_json::from_slice(&org_paid("subscription.updated", "org_1")).unwrap();
    let mut older = v["data"]["items"][0].clone();
    older["updated_at"] = json!(1);
    older["status"] = json!("upcoming");
    v["data"]["items"].as_array_mut().unwrap().insert(0, older);
    let d = decode("", &serde_json::to_vec(&v).unwrap()).unwrap();
    let Event::Billing(b) = d.event else {
        panic!("wrong event")
    };
    assert_eq!(b.items.len(), 1);
    assert_eq!(b.items[0].status, "active");
}

#[test]
fn backend_api_subscription_reads_subscription_items() {
    let v = json!({
        "object": "commerce_subscription", "id": "csub_1", "status": "past_due",
        "payer_id": "cpayer_1", "past_due_at": 1_700_000_000_000i64,
        "updated_at": 1_700_000_000_001i64,
        "subscription_items": [{
            "id": "csub_item_1", "status": "expired", "is_free_trial": false,
            "updated_at": 5, "plan": {"slug": "pro"}, "seats": {"quantity": 10}
        }]
    });
    let b = subscription_object("org_9", &v).unwrap();
    assert_eq!(b.organization_id, "org_9");
    assert_eq!(b.subscription.unwrap().status, "past_due");
    assert_eq!(b.items[0].status, "expired");
    assert_eq!(b.items[0].seats, Seats::Limited(10));
    assert_eq!(b.items[0].subscription_id.as_deref(), Some("csub_1"));
}
