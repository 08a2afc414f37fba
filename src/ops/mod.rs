//! Operator commands: send test events, dead letters, the event log, reconcile. (The
//! load tools are a binary of their own, `provisioner-load`, outside the product.)
//!
//! Each command is a library function returning typed results (tests call them
//! directly) plus a `run` that prints them for a human or as one JSON document.

pub mod dlq;
pub mod events;
pub mod reconcile;
pub mod send;

use chrono::{DateTime, SecondsFormat, Utc};

/// A time as operators read it: RFC 3339 UTC, whole seconds.
pub fn fmt_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A plain text table: left-aligned columns, two spaces apart, one line per row.
/// Cells are flattened to one line and the last column is not padded.
pub fn render_table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let clean = |s: &str| s.replace(['\n', '\r', '\t'], " ");
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                out.push_str(&" ".repeat(pad));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(headers.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_flattens_cells() {
        let t = render_table(
            &["A", "BB"],
            vec![
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "two\nlines".into()],
            ],
        );
        assert_eq!(t, "A    BB\nxyz  1\nq    two lines\n");
    }
}
