//! A matcher over a Prometheus text scrape.

/// One sample: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parse the text exposition format (enough of it for tests: no escapes inside label values
/// other than `\"` and `\\`).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value) = match line.rfind(' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.find('{') {
            None => (head.to_string(), Vec::new()),
            Some(i) => {
                let name = head[..i].to_string();
                let body = head[i + 1..].trim_end_matches('}');
                (name, parse_labels(body))
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn parse_labels(body: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = body;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(stripped) = after.strip_prefix('"') else {
            break;
        };
        let mut val = String::new();
        let mut chars = stripped.char_indices();
        let mut end = stripped.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        labels.push((key, val));
        rest = &stripped[end..];
    }
    labels
}

/// The sum of all samples named `name` whose labels include every pair in `want`.
pub fn value(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    parse(text)
        .into_iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_labels_and_sums() {
        let text =
            "# TYPE x counter\nx{a=\"1\",b=\"q\\\"\"} 2\nx{a=\"1\",b=\"z\"} 3\nx{a=\"2\"} 5\ny 1\n";
        assert_eq!(super::value(text, "x", &[("a", "1")]), 5.0);
        assert_eq!(super::value(text, "x", &[("b", "q\"")]), 2.0);
        assert_eq!(super::value(text, "y", &[]), 1.0);
    }
}
