//! Spend reports, the same for `switchyard spend` and `GET /admin/spend`: a time window,
//! a grouping, and three formats.

use chrono::{NaiveDate, TimeZone, Utc};

use super::store::{GroupBy, SpendLine, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
    Csv,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "table" => Some(Format::Table),
            "json" => Some(Format::Json),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }
}

pub fn parse_group(s: &str) -> Option<GroupBy> {
    match s {
        "key" => Some(GroupBy::Key),
        "team" => Some(GroupBy::Team),
        "model" | "route" => Some(GroupBy::Model),
        "deployment" => Some(GroupBy::Deployment),
        _ => None,
    }
}

/// A time: RFC 3339 (`2026-11-01T00:00:00Z`), a date (`2026-11-01`, midnight UTC), a Unix
/// time in seconds, or a time ago (`30m`, `24h`, `7d`).
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(Utc.from_utc_datetime(&t).timestamp_millis());
        }
    }
    let far = || format!("`{s}` is too far from now");
    if let Ok(secs) = s.parse::<i64>() {
        return secs.checked_mul(1000).ok_or_else(far);
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a time (2026-11-01, 2026-11-01T12:00:00Z, 24h, 7d)"))?;
    let ms = match unit {
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => {
            return Err(format!(
                "`{s}` is not a time (2026-11-01, 2026-11-01T12:00:00Z, 24h, 7d)"
            ))
        }
    };
    ms.and_then(|ms| now_ms.checked_sub(ms)).ok_or_else(far)
}

pub async fn report(
    store: &Store,
    by: GroupBy,
    since_ms: i64,
    until_ms: i64,
) -> Result<Vec<SpendLine>, String> {
    let mut lines = store
        .report(by, since_ms, until_ms)
        .await
        .map_err(|e| format!("cannot read the ledger: {e}"))?;
    // A database's float sum carries noise below a nano-dollar (0.00021999999999999998 for
    // 0.00022), which depends on the order it added the rows in: to the nano-dollar, the CLI
    // and the admin API print the same figures.
    for l in &mut lines {
        l.cost_usd = to_nano_dollar(l.cost_usd);
    }
    Ok(lines)
}

/// A sum of dollars to the nano-dollar, without the float noise below it.
pub fn to_nano_dollar(usd: f64) -> f64 {
    (usd * 1e9).round() / 1e9
}

pub fn render(lines: &[SpendLine], by: GroupBy, format: Format) -> String {
    let group = match by {
        GroupBy::Key => "key",
        GroupBy::Team => "team",
        GroupBy::Model => "model",
        GroupBy::Deployment => "deployment",
    };
    // From +0.0: a float sum of nothing is -0.0, which would print as `-0.0`.
    let total: f64 = lines.iter().map(|l| l.cost_usd).fold(0.0, |a, c| a + c);
    let total = (total * 1e9).round() / 1e9;
    match format {
        Format::Json => serde_json::json!({
            "by": group,
            "total_cost_usd": total,
            "rows": lines,
        })
        .to_string(),
        Format::Csv => {
            let mut out = format!(
                "{group},requests,prompt_tokens,cached_tokens,completion_tokens,cost_usd,cache_hits\n"
            );
            for l in lines {
                // RFC 4180: a field holding a comma, a quote or a line break (CR too) is quoted.
                let name = if l.name.contains([',', '"', '\n', '\r']) {
                    format!("\"{}\"", l.name.replace('"', "\"\""))
                } else {
                    l.name.clone()
                };
                out.push_str(&format!(
                    "{name},{},{},{},{},{:.6},{}\n",
                    l.requests,
                    l.prompt_tokens,
                    l.cached_tokens,
                    l.completion_tokens,
                    l.cost_usd,
                    l.cache_hits
                ));
            }
            out
        }
        Format::Table => {
            // A name holding control characters (a user id with a line break, say) is shown
            // escaped: written raw, it broke the table's lines on a terminal.
            let shown: Vec<std::borrow::Cow<str>> = lines
                .iter()
                .map(|l| match l.name.as_str() {
                    "" => "-".into(),
                    n if n.chars().any(char::is_control) => n.escape_debug().to_string().into(),
                    n => n.into(),
                })
                .collect();
            let width = shown
                .iter()
                .map(|n| n.chars().count())
                .chain([group.len(), 5])
                .max()
                .unwrap_or(10);
            let mut out = format!(
                "{group:<width$}  {:>9}  {:>12}  {:>10}  {:>12}  {:>14}\n",
                "requests", "prompt", "cached", "completion", "cost (USD)"
            );
            for (l, name) in lines.iter().zip(&shown) {
                out.push_str(&format!(
                    "{name:<width$}  {:>9}  {:>12}  {:>10}  {:>12}  {:>14.6}\n",
                    l.requests, l.prompt_tokens, l.cached_tokens, l.completion_tokens, l.cost_usd
                ));
            }
            out.push_str(&format!(
                "{:<width$}  {:>9}  {:>12}  {:>10}  {:>12}  {:>14.6}\n",
                "total",
                lines.iter().map(|l| l.requests).sum::<i64>(),
                lines.iter().map(|l| l.prompt_tokens).sum::<i64>(),
                lines.iter().map(|l| l.cached_tokens).sum::<i64>(),
                lines.iter().map(|l| l.completion_tokens).sum::<i64>(),
                total
            ));
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_line_breaks_keep_csv_and_table_rows_whole() {
        let lines = [SpendLine {
            name: "alice\rbob,\"x\"".into(),
            requests: 1,
            ..Default::default()
        }];
        let csv = render(&lines, GroupBy::Key, Format::Csv);
        assert!(csv.contains("\n\"alice\rbob,\"\"x\"\"\",1,"), "{csv}");
        let table = render(&lines, GroupBy::Key, Format::Table);
        assert_eq!(table.matches('\r').count(), 0, "{table}");
        assert!(table.contains("alice\\rbob"), "{table}");
    }

    #[test]
    fn times() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("24h", now).unwrap(), now - 86_400_000);
        assert_eq!(parse_time("2026-11-01", now).unwrap(), 1_793_491_200_000);
        assert_eq!(
            parse_time("2026-11-01T00:00:00Z", now).unwrap(),
            1_793_491_200_000
        );
        assert!(parse_time("soon", now).is_err());
        // Too far back (or forth) for the clock: refused, not wrapped into another time.
        for far in [
            "999999999999d",
            "99999999999999h",
            "9223372036854775807",
            "-999999999999d",
        ] {
            assert!(
                parse_time(far, now).unwrap_err().contains("too far"),
                "{far}"
            );
        }
    }
}
