//! Signature check of one ~1.5 KB Clerk event through `intake::Verifier::verify`
//! (issue 2 target: ≤ 2 µs). `cargo test --all-targets` runs each case once
//! (criterion's test mode); `cargo bench --bench signature` measures.

use axum::http::{HeaderMap, HeaderValue};
use criterion::{Criterion, criterion_group, criterion_main};
use provisioner::clerk::sample::{EVENT_SIZE, organization_event};
use provisioner::config::{DEVELOPMENT_WEBHOOK_SECRET, Secret};
use provisioner::intake::Verifier;

fn headers(id: &str, signature: &str) -> HeaderMap {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut h = HeaderMap::new();
    h.insert("svix-id", HeaderValue::from_str(id).unwrap());
    h.insert("svix-timestamp", HeaderValue::from(now));
    h.insert("svix-signature", HeaderValue::from_str(signature).unwrap());
    h
}

fn signed(verifier: &Verifier, body: &[u8]) -> HeaderMap {
    let id = "msg_2g7np7Hrk0SN6kj5EDMLDaKNL0S";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    headers(id, &verifier.sign(id, now, body).unwrap())
}

fn verify(c: &mut Criterion) {
    let body = organization_event("bench", 1, EVENT_SIZE);
    assert_eq!(body.len(), EVENT_SIZE);

    let one = Verifier::new(&[Secret::new(DEVELOPMENT_WEBHOOK_SECRET)]);
    let h = signed(&one, &body);
    assert!(one.verify(&body, &h).is_ok());
    c.bench_function("verify 1.5 KB event, one secret", |b| {
        b.iter(|| one.verify(std::hint::black_box(&body), std::hint::black_box(&h)))
    });

    // Rotation: the event is signed by the second of two secrets, the worst case.
    let new = Verifier::new(&[Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]);
    let two = Verifier::new(&[
        Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        Secret::new(DEVELOPMENT_WEBHOOK_SECRET),
    ]);
    let h2 = signed(&one, &body);
    assert!(new.verify(&body, &h2).is_err());
    assert!(two.verify(&body, &h2).is_ok());
    c.bench_function("verify 1.5 KB event, second of two secrets", |b| {
        b.iter(|| two.verify(std::hint::black_box(&body), std::hint::black_box(&h2)))
    });

    // A forged signature costs the same HMAC and must be refused.
    let forged = headers(
        "msg_2g7np7Hrk0SN6kj5EDMLDaKNL0S",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    );
    assert!(one.verify(&body, &forged).is_err());
    c.bench_function("refuse 1.5 KB event, bad signature", |b| {
        b.iter(|| one.verify(std::hint::black_box(&body), std::hint::black_box(&forged)))
    });

    // The floor on this CPU: one bare HMAC-SHA256 over the same signed content
    // ("id.timestamp.body"), no headers, no base64, no comparison.
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &[7u8; 32]);
    let mut content = b"msg_2g7np7Hrk0SN6kj5EDMLDaKNL0S.1716883200.".to_vec();
    content.extend_from_slice(&body);
    c.bench_function("floor: bare HMAC-SHA256 of the same 1.5 KB", |b| {
        b.iter(|| aws_lc_rs::hmac::sign(&key, std::hint::black_box(&content)))
    });
}

criterion_group!(benches, verify);
criterion_main!(benches);
