//! The shipped Grafana dashboards, alert rules and Prometheus config, checked without a
//! cluster: the dashboards by lint (ids, uids, titles, descriptions, units, the datasource
//! variable, `$__rate_interval`, metric names from `shoal_ops`'s catalog), the rules and
//! config by `promtool`.

use serde_json::Value;
use shoal_tests::prometheus::{dashboards_dir, promtool};
use std::collections::BTreeSet;

/// The four dashboards the operators' guide promises.
const DASHBOARDS: [&str; 4] = [
    "cluster-overview.json",
    "model-serving.json",
    "control-plane.json",
    "nodes-and-devices.json",
];

fn load(name: &str) -> Value {
    let path = dashboards_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// Every series name Prometheus may be asked for: the catalog's, with histogram suffixes.
fn known_series() -> BTreeSet<String> {
    shoal_ops::metrics::CATALOG
        .iter()
        .flat_map(|definition| definition.series_names())
        .collect()
}

/// The `shoal_…` identifiers in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = text.as_bytes();
    let mut index = 0;
    while let Some(found) = text[index..].find("shoal_") {
        let start = index + found;
        let preceded_by_word =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if !preceded_by_word {
            names.push(text[start..end].to_string());
        }
        index = end;
    }
    names
}

fn panels_of(dashboard: &Value) -> Vec<Value> {
    fn walk(panels: &Value, into: &mut Vec<Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            into.push(panel.clone());
            walk(&panel["panels"], into);
        }
    }
    let mut panels = Vec::new();
    walk(&dashboard["panels"], &mut panels);
    panels
}

/// Everything wrong with one dashboard, as sentences.
fn lint(name: &str, dashboard: &Value, known: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut problem = |text: String| problems.push(format!("{name}: {text}"));
    if dashboard["title"].as_str().unwrap_or("").is_empty() {
        problem("no title".into());
    }
    let variables: Vec<&Value> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let datasource_variable = variables.iter().any(|variable| {
        variable["name"] == "datasource"
            && variable["type"] == "datasource"
            && variable["query"] == "prometheus"
    });
    if !datasource_variable {
        problem("no `datasource` variable of type datasource for prometheus".into());
    }
    let variable_names: BTreeSet<String> = variables
        .iter()
        .filter_map(|variable| variable["name"].as_str().map(str::to_string))
        .collect();
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        if variable["datasource"]["uid"] != "${datasource}" {
            problem(format!(
                "variable {} does not query through ${{datasource}}",
                variable["name"]
            ));
        }
        let query = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str())
            .or_else(|| variable["definition"].as_str())
            .unwrap_or("");
        for metric in metric_names(query) {
            if !known.contains(&metric) {
                problem(format!(
                    "variable {} uses unknown {metric}",
                    variable["name"]
                ));
            }
        }
    }
    let mut ids = BTreeSet::new();
    for panel in panels_of(dashboard) {
        let title = panel["title"].as_str().unwrap_or("");
        let label = format!("panel {} {title:?}", panel["id"]);
        match panel["id"].as_u64() {
            Some(id) if !ids.insert(id) => problem(format!("{label}: duplicate id")),
            Some(_) => {}
            None => problem(format!("{label}: no integer id")),
        }
        if title.is_empty() {
            problem(format!("{label}: no title"));
        }
        if panel["type"] == "row" {
            if panel["targets"].as_array().is_some_and(|t| !t.is_empty()) {
                problem(format!("{label}: a row with queries"));
            }
            continue;
        }
        if panel["description"].as_str().unwrap_or("").is_empty() {
            problem(format!("{label}: no description"));
        }
        if panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or("")
            .is_empty()
        {
            problem(format!("{label}: no unit"));
        }
        if panel["datasource"]["uid"] != "${datasource}" {
            problem(format!("{label}: datasource is not ${{datasource}}"));
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problem(format!("{label}: no queries"));
        }
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or("");
            if expr.is_empty() {
                problem(format!("{label}: a target without expr"));
            }
            if target["datasource"]["uid"] != "${datasource}" {
                problem(format!("{label}: a target not on ${{datasource}}"));
            }
            for metric in metric_names(expr) {
                if !known.contains(&metric) {
                    problem(format!("{label}: {metric} is not in shoal_ops's catalog"));
                }
            }
            let ranged = expr.contains("rate(") || expr.contains("increase(");
            if ranged && !expr.contains("[$__rate_interval]") {
                problem(format!(
                    "{label}: a rate without [$__rate_interval]: {expr}"
                ));
            }
            // Only `$__rate_interval` and the dashboard's own variables.
            let mut rest = expr.replace("$__rate_interval", "");
            for variable in &variable_names {
                rest = rest
                    .replace(&format!("${{{variable}}}"), "")
                    .replace(&format!("${variable}"), "");
            }
            if rest.contains('$') {
                problem(format!("{label}: an unknown variable or macro in {expr}"));
            }
        }
    }
    problems
}

#[test]
fn every_dashboard_passes_the_lint() {
    let known = known_series();
    let mut problems = Vec::new();
    let mut uids = BTreeSet::new();
    for name in DASHBOARDS {
        let dashboard = load(name);
        let uid = dashboard["uid"].as_str().unwrap_or("").to_string();
        if uid.is_empty() || !uids.insert(uid.clone()) {
            problems.push(format!("{name}: missing or duplicate uid {uid:?}"));
        }
        problems.extend(lint(name, &dashboard, &known));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_lint_catches_a_broken_panel() {
    let known = known_series();
    let mut dashboard = load("model-serving.json");
    let panels = dashboard["panels"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("panels"));
    let mut broken = panels
        .iter()
        .find(|panel| panel["type"] != "row")
        .cloned()
        .unwrap_or_else(|| panic!("a panel"));
    broken["description"] = Value::Null;
    broken["fieldConfig"]["defaults"]["unit"] = Value::Null;
    broken["targets"][0]["expr"] = "rate(shoal_made_up_total[5m])".into();
    panels.push(broken);
    let problems = lint("broken", &dashboard, &known).join("\n");
    for expected in [
        "duplicate id",
        "no description",
        "no unit",
        "shoal_made_up_total is not in",
        "without [$__rate_interval]",
    ] {
        assert!(
            problems.contains(expected),
            "{expected:?} not in:\n{problems}"
        );
    }
}

#[test]
fn the_alert_rules_use_only_catalogued_metrics() {
    let known = known_series();
    let text = std::fs::read_to_string(dashboards_dir().join("alerts.yml"))
        .unwrap_or_else(|error| panic!("alerts.yml: {error}"));
    let unknown: Vec<String> = metric_names(&text)
        .into_iter()
        .filter(|name| !known.contains(name))
        .collect();
    assert!(unknown.is_empty(), "alerts.yml uses {unknown:?}");
}

#[test]
fn promtool_checks_the_alert_rules_and_the_scrape_config() {
    for args in [
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
    ] {
        let (clean, printed) = promtool(&dashboards_dir(), &args, None);
        assert!(clean, "promtool {args:?}:\n{printed}");
    }
}

#[test]
fn the_alert_rules_pass_their_promtool_unit_tests() {
    let (passed, printed) = promtool(
        &dashboards_dir(),
        &["test", "rules", "alerts.test.yml"],
        None,
    );
    assert!(passed, "promtool test rules:\n{printed}");
    assert!(printed.contains("SUCCESS"), "{printed}");
}
