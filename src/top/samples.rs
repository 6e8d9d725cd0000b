//! The samples of a Prometheus / OpenMetrics text exposition, as the agent's `GET /metrics`
//! renders it: `name{label="value",...} value`, comments and blank lines skipped.

use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples(pub Vec<Sample>);

impl Samples {
    /// Parses the text; a line that is not a sample is an error naming it.
    pub fn parse(text: &str) -> Result<Samples, String> {
        text.lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| parse_line(line).ok_or_else(|| format!("not a metrics sample: {line}")))
            .collect::<Result<Vec<_>, _>>()
            .map(Samples)
    }

    /// The value of the sample with exactly these labels (in any order).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
    }

    /// The value of the sample without labels, 0 when absent.
    pub fn value(&self, name: &str) -> f64 {
        self.get(name, &[]).unwrap_or(0.0)
    }

    /// The value of `name{label="value"}`, 0 when absent (a family creates its counters on
    /// first use).
    pub fn labelled(&self, name: &str, label: &str, value: &str) -> f64 {
        self.get(name, &[(label, value)]).unwrap_or(0.0)
    }

    /// Every sample name (`outpost_updates_total`, `outpost_delivery_latency_seconds_bucket`, …).
    pub fn names(&self) -> BTreeSet<&str> {
        self.0.iter().map(|s| s.name.as_str()).collect()
    }

    /// A histogram's cumulative buckets `(le, count)`, in increasing `le` (`+Inf` last).
    pub fn buckets(&self, histogram: &str) -> Vec<(f64, f64)> {
        let name = format!("{histogram}_bucket");
        let mut buckets: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| {
                let le = s.labels.iter().find(|(k, _)| k == "le")?;
                Some((parse_number(&le.1)?, s.value))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }
}

fn parse_number(text: &str) -> Option<f64> {
    // Rust reads "inf", "+Inf", "NaN" in any case.
    text.parse().ok()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            // A label: key="value", then `,` or `}`.
            while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                chars.next();
            }
            let (start, c) = *chars.peek()?;
            if c == '}' {
                rest = &inner[start + 1..];
                break;
            }
            let eq = inner[start..].find('=')? + start;
            let key = inner[start..eq].trim().to_owned();
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.push((key, value));
        }
    }
    // The value, then an optional timestamp or exemplar.
    let value = parse_number(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_table() {
        type Expected<'a> = Option<(&'a str, &'a [(&'a str, &'a str)], f64)>;
        let table: &[(&str, Expected)] = &[
            (
                "outpost_outbox_pending 12",
                Some(("outpost_outbox_pending", &[], 12.0)),
            ),
            (
                "outpost_updates_total{result=\"stale\"} 3",
                Some(("outpost_updates_total", &[("result", "stale")], 3.0)),
            ),
            (
                "outpost_delivery_latency_seconds_bucket{le=\"+Inf\"} 7",
                Some((
                    "outpost_delivery_latency_seconds_bucket",
                    &[("le", "+Inf")],
                    7.0,
                )),
            ),
            (
                "m{a=\"x\",b=\"q\\\"uote,}\"} 1.5 1700000000",
                Some(("m", &[("a", "x"), ("b", "q\"uote,}")], 1.5)),
            ),
            ("m{a=\"x\"} NaN", Some(("m", &[("a", "x")], f64::NAN))),
            ("m 1e3", Some(("m", &[], 1000.0))),
            ("m{a=\"x\" 1", None),
            ("m{a=x} 1", None),
            ("m", None),
            ("m{} 2", Some(("m", &[], 2.0))),
            ("m abc", None),
        ];
        for (line, expected) in table {
            let got = parse_line(line);
            match (got, expected) {
                (None, None) => {}
                (Some(sample), Some((name, labels, value))) => {
                    assert_eq!(sample.name, *name, "{line}");
                    let labels: Vec<(String, String)> = labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    assert_eq!(sample.labels, labels, "{line}");
                    assert!(
                        sample.value == *value || (value.is_nan() && sample.value.is_nan()),
                        "{line}: {}",
                        sample.value
                    );
                }
                (got, expected) => panic!("{line}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn a_whole_exposition() {
        let text = "# HELP outpost_updates Profile updates by result.\n\
            # TYPE outpost_updates counter\n\
            outpost_updates_total{result=\"exported\"} 10\n\
            outpost_updates_total{result=\"stale\"} 2\n\
            # TYPE outpost_delivery_latency_seconds histogram\n\
            outpost_delivery_latency_seconds_sum 0.5\n\
            outpost_delivery_latency_seconds_count 10\n\
            outpost_delivery_latency_seconds_bucket{le=\"0.002\"} 8\n\
            outpost_delivery_latency_seconds_bucket{le=\"0.001\"} 4\n\
            outpost_delivery_latency_seconds_bucket{le=\"+Inf\"} 10\n\
            \n\
            # EOF\n";
        let samples = Samples::parse(text).unwrap();
        assert_eq!(
            samples.labelled("outpost_updates_total", "result", "stale"),
            2.0
        );
        assert_eq!(
            samples.labelled("outpost_updates_total", "result", "deleted"),
            0.0
        );
        assert_eq!(
            samples.value("outpost_delivery_latency_seconds_count"),
            10.0
        );
        assert_eq!(
            samples.buckets("outpost_delivery_latency_seconds"),
            vec![(0.001, 4.0), (0.002, 8.0), (f64::INFINITY, 10.0)]
        );
        assert!(samples.names().contains("outpost_updates_total"));
        assert_eq!(
            Samples::parse("ok 1\nbroken{\n").unwrap_err(),
            "not a metrics sample: broken{"
        );
    }
}
