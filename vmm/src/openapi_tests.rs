//! docs/openapi.json against the router: every path and method it lists answers, before start
//! and after, with a status it lists, and every body validates against that status's schema.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::*;
use crate::api::ApiHandler;
#[allow(unused_imports)]
use crate::config::{BalloonFile, BootFile, MachineFile, MemoryFile};
use crate::config::{BalloonSettings, ConfigFile};
use crate::preboot::{PreBoot, PreBootApi};

fn spec() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A request body for `method path` that the endpoint accepts when it can (`""` for none).
fn example(method: &str, path: &str, kernel: &str) -> String {
    match (method, path) {
        ("PUT", "/boot-source") => {
            json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}).to_string()
        }
        ("PUT", "/machine-config") => r#"{"vcpu_count": 1, "mem_size_mib": 256}"#.into(),
        ("PATCH", "/machine-config") => r#"{"mem_size_mib": 256}"#.into(),
        ("PUT", "/balloon") => {
            r#"{"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#.into()
        }
        ("PATCH", "/balloon") => r#"{"amount_mib": 16}"#.into(),
        ("PATCH", "/balloon/statistics") => r#"{"stats_polling_interval_s": 0}"#.into(),
        ("PUT", "/actions") => r#"{"action_type": "FlushMetrics"}"#.into(),
        ("PUT", "/memory/reclaim") => "{}".into(),
        _ => String::new(),
    }
}

/// The validator for the schema `schema` (which may `$ref` into the document's components).
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let mut root = schema.clone();
    if let Some(obj) = root.as_object_mut() {
        obj.insert("components".into(), doc["components"].clone());
    }
    jsonschema::validator_for(&root).unwrap()
}

/// The response object of `op` for `status`, `$ref`s followed.
fn response<'a>(doc: &'a Value, op: &'a Value, status: u16) -> Option<&'a Value> {
    let r = op["responses"].get(status.to_string())?;
    match r.get("$ref").and_then(Value::as_str) {
        Some(rf) => {
            let name = rf.trim_start_matches("#/components/responses/");
            doc["components"]["responses"].get(name)
        }
        None => Some(r),
    }
}

/// Sends every operation of the document to `h` and checks the answers; returns what was sent.
fn check(doc: &Value, h: &mut dyn ApiHandler, phase: &str, kernel: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let method = method.to_ascii_uppercase();
            let body = example(&method, path, kernel);
            let r = crate::api::precheck(&method, path, body.as_bytes())
                .unwrap_or_else(|| h.handle(&method, path, body.as_bytes()));
            let what = format!("{phase}: {method} {path} -> {} {:?}", r.status, r.body);
            let resp = response(doc, op, r.status)
                .unwrap_or_else(|| panic!("{what}: status not in the document"));
            if let Some(text) = &r.text {
                let listed = resp["content"]
                    .get("application/openmetrics-text")
                    .is_some();
                assert!(listed && text.ends_with("# EOF\n"), "{what}: a text answer");
                seen.insert(format!("{method} {path}"));
                continue;
            }
            match (r.status, &r.body) {
                (204, None) => {}
                (204, Some(_)) => panic!("{what}: a 204 has no body"),
                (_, Some(body)) => {
                    let schema = &resp["content"]["application/json"]["schema"];
                    assert!(!schema.is_null(), "{what}: no schema for the body");
                    let v = validator(doc, schema);
                    let errors: Vec<String> = v.iter_errors(body).map(|e| e.to_string()).collect();
                    assert!(errors.is_empty(), "{what}: {errors:?}");
                }
                (_, None) => panic!("{what}: no body"),
            }
            seen.insert(format!("{method} {path}"));
        }
    }
    seen
}

#[test]
fn every_documented_operation_answers_as_documented() {
    let doc = spec();
    let kernel = std::env::current_exe().unwrap();
    let kernel = kernel.to_str().unwrap();

    // Before start.
    let state = std::sync::Arc::new(std::sync::Mutex::new(PreBoot::new(ConfigFile::default())));
    let mut pre = PreBootApi(state);
    let before = check(&doc, &mut pre, "before start", kernel);
    assert!(before.len() >= 17, "{before:?}");

    // After start: ebb's handlers over real guest memory and a balloon without a driver.
    let file = ConfigFile {
        boot: BootFile {
            kernel: Some(kernel.into()),
            ..Default::default()
        },
        machine: MachineFile {
            memory_mib: Some(128),
            ..Default::default()
        },
        balloon: Some(BalloonFile {
            stats_polling_interval_s: Some(1),
            ..Default::default()
        }),
        ..ConfigFile::default()
    };
    let config = VmConfig::validate(file).unwrap();
    let memory =
        Arc::new(VmMemory::new(&config).expect("tracked guest RAM (userfaultfd needs root)"));
    let settings: BalloonSettings = config.balloon.unwrap();
    let parts = crate::devices::virtio::balloon::build(&memory, &settings).unwrap();
    let mut status = StatusHandler {
        config: config.clone(),
        memory: memory.clone(),
        started: Instant::now(),
        control: Arc::new(VmControl::new().unwrap()),
        extra: Some(parts.api),
    };
    let after = check(&doc, &mut status, "after start", kernel);
    assert_eq!(before, after, "the same operations in both phases");

    // What is not in the document is refused the documented way.
    for h in [&mut pre as &mut dyn ApiHandler, &mut status] {
        let r = h.handle("GET", "/nowhere", b"");
        let ok = validator(&doc, &json!({"$ref": "#/components/schemas/Error"}));
        assert_eq!(r.status, 400);
        assert!(ok.is_valid(r.body.as_ref().unwrap()));
    }
}
