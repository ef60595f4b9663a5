//! `strftime_now` for chat templates (Llama 3.x and Mistral Small put the
//! date in the system prompt): the current local time formatted as Python's
//! `datetime.now().strftime` formats it, through chrono's strftime (the
//! directives of C's strftime, glibc's `%-d` padding flags included).
//!
//! `STARLING_NOW` (Unix seconds) fixes the clock and reads it in UTC, so
//! tests render the same text as a Python reference made on another day.

use anyhow::{Result, bail};
use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, Local, TimeZone, Utc};

/// `format` applied to the current time (local), or to `STARLING_NOW` (UTC).
pub fn strftime_now(format: &str) -> Result<String> {
    match std::env::var("STARLING_NOW")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
    {
        Some(fixed) => strftime(format, fixed),
        None => render(&Local::now(), format),
    }
}

/// `format` applied to `unix` seconds in UTC.
pub fn strftime(format: &str, unix: i64) -> Result<String> {
    let Some(time) = Utc.timestamp_opt(unix, 0).single() else {
        bail!("{unix} is not a time strftime can show");
    };
    render(&time, format)
}

fn render<Tz: TimeZone>(time: &DateTime<Tz>, format: &str) -> Result<String>
where
    Tz::Offset: std::fmt::Display,
{
    // Python's %f is microseconds; chrono's is nanoseconds unless given a width.
    let mut python = String::with_capacity(format.len());
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        python.push(c);
        if c == '%' {
            match chars.next() {
                Some('f') => python.push_str("6f"),
                Some(other) => python.push(other),
                None => {}
            }
        }
    }
    let items: Vec<Item<'_>> = StrftimeItems::new(&python).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        bail!("strftime_now: {format:?} holds a directive strftime does not know");
    }
    Ok(time.format_with_items(items.into_iter()).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_python() {
        // datetime(2026, 7, 26, 13, 5, 9) UTC, a Sunday; the texts are Python's.
        let t = 1_785_071_109;
        let f = |format: &str| strftime(format, t).unwrap();
        assert_eq!(
            f("%d %b %Y|%Y-%m-%d|%B %d, %Y|%A %a|%H:%M:%S %I%p|%j|%y|%%"),
            "26 Jul 2026|2026-07-26|July 26, 2026|Sunday Sun|13:05:09 01PM|207|26|%"
        );
        // glibc's flags and the directives the hand-written version lacked.
        assert_eq!(
            f("%-d|%e|%U|%c|%x|%X|%s|%G-W%V-%u|%f|%z"),
            "26|26|30|Sun Jul 26 13:05:09 2026|07/26/26|13:05:09|1785071109|2026-W30-7|000000|+0000"
        );
        assert_eq!(strftime("%Y-%m-%d %a", 0).unwrap(), "1970-01-01 Thu");
        assert_eq!(
            strftime("%Y-%m-%d %j", 951_782_400).unwrap(),
            "2000-02-29 060"
        );
        let err = strftime("%Q", t).unwrap_err().to_string();
        assert!(err.contains("does not know"), "{err}");
    }
}
