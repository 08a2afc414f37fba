//! The console's HTML: one layout, and the small pieces every page shares (times,
//! JSON bodies, badges, empty states, error pages).
//!
//! Guarantee: every value reaches the page through maud's `(…)` splices, which
//! escape `& < > " '` — payloads are attacker-controlled, and nothing here uses
//! `PreEscaped` on data. No inline script or style: the page loads
//! `/ops/static/ops.css` and `ops.js` only, as the Content-Security-Policy demands.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use super::operator::{Flash, Operator};

/// The pages of the top navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// `/ops`.
    Overview,
    /// `/ops/dead-letters`.
    DeadLetters,
    /// `/ops/events`.
    Events,
    /// A workspace page.
    Workspace,
    /// Login, errors.
    None,
}

/// A whole page: header with navigation and the operator, the flash, `body`.
pub fn page(title: &str, operator: Option<&Operator>, nav: Nav, body: Markup) -> Markup {
    let link = |href: &str, label: &str, this: Nav| {
        html! {
            a href=(href) aria-current=[(nav == this).then_some("page")] { (label) }
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · provisioner ops" }
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/ops/static/ops.css";
                script src="/ops/static/ops.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/ops" { "Callmine provisioner" span.tag { "ops" } }
                    @if let Some(operator) = operator {
                        nav {
                            (link("/ops", "Overview", Nav::Overview))
                            (link("/ops/dead-letters", "Dead letters", Nav::DeadLetters))
                            (link("/ops/events", "Events", Nav::Events))
                        }
                        form.who method="post" action="/ops/logout" {
                            span { "signed in as " strong { (operator.label) } }
                            (csrf(operator))
                            button.link type="submit" { "Log out" }
                        }
                    }
                }
                main {
                    @if let Some(flash) = operator.and_then(|o| o.flash.as_ref()) {
                        (flash_box(flash))
                    }
                    (body)
                }
            }
        }
    }
}

/// The result line of the last action.
pub fn flash_box(flash: &Flash) -> Markup {
    html! {
        div.flash.ok[flash.ok].failed[!flash.ok] role="status" {
            p { (flash.text) }
            @if !flash.lines.is_empty() {
                ul { @for line in &flash.lines { li { (line) } } }
            }
        }
    }
}

/// The hidden CSRF input every POST form carries.
pub fn csrf(operator: &Operator) -> Markup {
    html! { input type="hidden" name="csrf" value=(operator.csrf); }
}

/// A time as `2026-12-04 23:40:12 UTC` with how long ago it was.
pub fn time(at: DateTime<Utc>) -> Markup {
    time_at(at, Utc::now())
}

fn time_at(at: DateTime<Utc>, now: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(at.to_rfc3339_opts(SecondsFormat::Secs, true)) {
            (at.format("%Y-%m-%d %H:%M:%S UTC"))
            " " span.ago { (relative(at, now)) }
        }
    }
}

/// An optional time, or a dash.
pub fn time_opt(at: Option<DateTime<Utc>>) -> Markup {
    match at {
        Some(at) => time(at),
        None => dash(),
    }
}

/// `just now`, `42 s ago`, `3 min ago`, `5 h ago`, `2 d ago` (or `in …`).
pub fn relative(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - at).num_seconds();
    let (n, future) = (secs.unsigned_abs(), secs < 0);
    let amount = match n {
        0..=4 => return "just now".to_owned(),
        5..=59 => format!("{n} s"),
        60..=3599 => format!("{} min", n / 60),
        3600..=86_399 => format!("{} h", n / 3600),
        _ => format!("{} d", n / 86_400),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// A muted dash for an absent value.
pub fn dash() -> Markup {
    html! { span.muted { "–" } }
}

/// Text, or a dash when absent.
pub fn text_opt(value: Option<&str>) -> Markup {
    match value {
        Some(v) if !v.is_empty() => html! { (v) },
        _ => dash(),
    }
}

/// A workspace id linking to its page.
pub fn workspace_link(id: Option<&str>) -> Markup {
    match id {
        Some(id) => {
            html! { a.mono href=(format!("/ops/workspaces/{}", path_segment(id))) { (id) } }
        }
        None => dash(),
    }
}

/// A svix id linking to its dead letter.
pub fn dead_letter_link(id: Option<&str>) -> Markup {
    match id {
        Some(id) => {
            html! { a.mono href=(format!("/ops/dead-letters/{}", path_segment(id))) { (id) } }
        }
        None => dash(),
    }
}

/// A JSON value pretty-printed in a collapsible block.
pub fn json_block(summary: &str, value: &Value, open: bool) -> Markup {
    let pretty = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    html! {
        details.json open[open] {
            summary { (summary) }
            pre { code { (pretty) } }
        }
    }
}

/// A small coloured label (`status`, `class`).
pub fn badge(text: &str) -> Markup {
    let kind = match text {
        "processed" | "active" | "completed" | "admin" => "good",
        "dead" | "payload" | "deleted" | "retries-exhausted" | "delivery-limit" => "bad",
        "superseded" | "ignored" | "skipped" => "muted",
        _ => "plain",
    };
    html! { span class=(format!("badge {kind}")) { (text) } }
}

/// The block shown where a table would be empty: what it means, what to do.
pub fn empty(title: &str, hint: Markup) -> Markup {
    html! {
        div.empty {
            p.title { (title) }
            p { (hint) }
        }
    }
}

/// A string as one path segment of a link (ids are Clerk's or Svix's, but a
/// hostile one must not break out of the path).
pub fn path_segment(raw: &str) -> String {
    url::form_urlencoded::byte_serialize(raw.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// A query string from the non-empty pairs (`?a=1&b=2`, or empty).
pub fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (k, v) in pairs {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            q.append_pair(k, v);
            any = true;
        }
    }
    if any {
        format!("?{}", q.finish())
    } else {
        String::new()
    }
}

/// An error page with its status.
pub fn error_page(
    status: StatusCode,
    title: &str,
    operator: Option<&Operator>,
    message: Markup,
) -> Response {
    let body = html! {
        h1 { (title) }
        div.panel { p { (message) } p { a href="/ops" { "Back to the overview" } } }
    };
    (status, page(title, operator, Nav::None, body)).into_response()
}

/// 400 for a query the page cannot take (say, a page size out of range).
pub fn bad_request(operator: &Operator, message: &str) -> Response {
    error_page(
        StatusCode::BAD_REQUEST,
        "Bad request",
        Some(operator),
        html! { (message) },
    )
}

/// 403 for a form without the session's CSRF token.
pub fn forbidden(operator: &Operator) -> Response {
    error_page(
        StatusCode::FORBIDDEN,
        "Form refused",
        Some(operator),
        html! {
            "This form did not carry this session's security token, so nothing was changed. "
            "Reload the page you came from and submit it again."
        },
    )
}

/// 503 when a dependency does not answer.
pub fn unavailable(message: &str) -> Response {
    error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        None,
        html! { (message) },
    )
}

/// 404 for a page that shows nothing.
pub fn not_found(operator: &Operator, what: Markup) -> Response {
    error_page(StatusCode::NOT_FOUND, "Not found", Some(operator), what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_read_like_a_person_says_them() {
        let now: DateTime<Utc> = "2026-12-04T12:00:00Z".parse().unwrap();
        let at = |s: i64| now - chrono::Duration::seconds(s);
        assert_eq!(relative(at(2), now), "just now");
        assert_eq!(relative(at(42), now), "42 s ago");
        assert_eq!(relative(at(180), now), "3 min ago");
        assert_eq!(relative(at(5 * 3600 + 10), now), "5 h ago");
        assert_eq!(relative(at(2 * 86_400), now), "2 d ago");
        assert_eq!(relative(at(-120), now), "in 2 min");
        let shown = time_at(at(180), now).into_string();
        assert!(shown.contains("2026-12-04 11:57:00 UTC"), "{shown}");
        assert!(shown.contains("3 min ago"), "{shown}");
    }

    #[test]
    fn hostile_values_are_escaped_everywhere() {
        let hostile = r#"<script>alert("x")</script>"#;
        let body = serde_json::json!({"name": hostile});
        let html = json_block("body", &body, true).into_string();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        let link = workspace_link(Some("org_\"><script>")).into_string();
        assert!(!link.contains("<script>"), "{link}");
        assert!(
            link.contains("/ops/workspaces/org_%22%3E%3Cscript%3E"),
            "{link}"
        );
    }

    #[test]
    fn queries_keep_only_given_filters() {
        assert_eq!(
            query(&[("type", Some("a b")), ("org", None), ("class", Some(""))]),
            "?type=a+b"
        );
        assert_eq!(query(&[("org", None)]), "");
    }
}
