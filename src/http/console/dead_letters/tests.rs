use super::*;

#[test]
fn only_console_list_pages_are_places_to_go_back_to() {
    let ok = Some("/ops/dead-letters?type=a&page=2".to_owned());
    assert_eq!(back_to(&ok), "/ops/dead-letters?type=a&page=2");
    for bad in [
        "https://evil.example/",
        "//evil.example/ops/dead-letters",
        "/ops/dead-letters//evil",
        "/ops/dead-letters\\x",
        "/v1/workspaces",
        "/ops/dead-letters\r\nSet-Cookie: x=y",
    ] {
        assert_eq!(back_to(&Some(bad.to_owned())), "/ops/dead-letters", "{bad}");
    }
    assert_eq!(back_to(&None), "/ops/dead-letters");
}

#[test]
fn filters_combine_and_ignore_blanks() {
    let letter = DeadLetter {
        position: 1,
        id: Some("msg_1".into()),
        kind: Some("organization.created".into()),
        workspace_id: Some("org_1".into()),
        error_class: Some("payload".into()),
        error: None,
        attempts: None,
        first_failed_at: None,
        received_at: None,
        size: 0,
    };
    let f = |kind: &str, org: &str, class: &str| Filters {
        kind: Some(kind.into()),
        org: Some(org.into()),
        class: Some(class.into()),
        ..Filters::default()
    };
    assert!(f("", " ", "").matches(&letter));
    assert!(f("organization.created", "org_1", "payload").matches(&letter));
    assert!(!f("organization.created", "org_2", "").matches(&letter));
    assert!(!f("", "", "delivery-limit").matches(&letter));
    assert_eq!(f("", "org_1", "").describe(), "workspace = org_1");
    assert_eq!(f("", "", "").describe(), "every dead letter");
}
