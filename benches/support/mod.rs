//! Helpers shared by the benchmark harnesses.

/// `text` with its `<!-- name:begin -->` ... `<!-- name:end -->` section replaced by
/// `section` (appended when missing).
pub fn replace_section(text: &str, name: &str, section: &str) -> String {
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->\n"),
    );
    match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) => format!("{}{}{}", &text[..b], section, &text[e + end.len()..]),
        _ => format!("{text}\n{section}"),
    }
}
