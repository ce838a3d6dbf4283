//! The `check` and `keys generate` commands, and where a command finds its config, run as a user runs them.

use std::process::Command;

fn switchyard(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    switchyard_in(None, args, env)
}

/// `switchyard` run in `dir` (else the test's own folder).
fn switchyard_in(
    dir: Option<&std::path::Path>,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(args).env_remove("SWITCHYARD_CONFIG");
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run switchyard");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `text` to `routes.yaml` in `dir` and runs `switchyard check` on it: the exit code,
/// stdout and stderr, and the file's path as the messages print it.
fn check_text(
    dir: &tempfile::TempDir,
    text: &str,
    env: &[(&str, &str)],
) -> (i32, String, String, String) {
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, text).unwrap();
    let p = path.to_str().unwrap().to_string();
    let (code, out, err) = switchyard(&["check", "--config", &p], env);
    (code, out, err, p)
}

#[test]
fn check_reports_every_error_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "\
providers:
  demo: { kind: mock }
models:
  a:
    deployments: [ { provider: nowhere } ]
    fallbacks: [b]
  b:
    deployments: [ { provider: demo } ]
    fallbacks: [a]
keys:
  - { name: app, key: sk-plain-text-key }
  - { name: app, key: \"${SY_TEST_UNSET_KEY_VAR}\" }
",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    // The unset variable is reported first (it stops typing); fix it to see the rest.
    let (code, _, err) = switchyard(&["check", "--config", p], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!(
            "{p}:12:23: environment variable `SY_TEST_UNSET_KEY_VAR` is not set"
        )),
        "{err}"
    );
    let (code, _, err) = switchyard(
        &["check", "--config", p],
        &[("SY_TEST_UNSET_KEY_VAR", "sk-from-env")],
    );
    assert_ne!(code, 0);
    let expect = [
        format!("{p}:5:32: route `a`: unknown provider `nowhere`"),
        format!("{p}:9:17: fallback cycle: a -> b -> a"),
        format!("{p}:11:23: key `app`: a plain client key is refused"),
        format!("{p}:12:13: duplicate key name `app`"),
    ];
    for e in expect {
        assert!(err.contains(&e), "missing `{e}` in:\n{err}");
    }
}

#[test]
fn check_accepts_the_default_config_and_lists_its_routes() {
    let root = env!("CARGO_MANIFEST_DIR");
    let (code, out, err) = switchyard(&["check", "--config", &format!("{root}/routes.yaml")], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("demo  [weighted]"), "{out}");
    assert!(out.contains("-> demo/demo-model (mock"), "{out}");
}

#[test]
fn keys_generate_prints_a_key_and_its_hash_line() {
    let (code, out, _) = switchyard(&["keys", "generate", "--name", "notebook"], &[]);
    assert_eq!(code, 0);
    let key = out
        .split_whitespace()
        .find(|w| w.starts_with("sk-sy-"))
        .expect("a key");
    assert!(key.len() >= 40);
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    assert!(
        out.contains(&format!("- {{ name: notebook, key: \"sha256:{hash}\" }}")),
        "{out}"
    );
    let (_, again, _) = switchyard(&["keys", "generate"], &[]);
    assert_ne!(out, again, "keys must be random");
    // Whatever the name, the printed line reads back as a key of that name.
    let (code, _, err) = switchyard(&["keys", "generate", "--name", " "], &[]);
    assert_eq!(code, 2, "{err}");
    for name in ["123", "true", "a: b #c", "@ops", "team \"q\"", "été"] {
        let (code, out, _) = switchyard(&["keys", "generate", "--name", name], &[]);
        assert_eq!(code, 0);
        let line = out.lines().find(|l| l.contains("sha256:")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (code, _, err, _) = check_text(
            &dir,
            &format!("providers: {{ p: {{ kind: mock }} }}\nmodels: {{ m: {{ deployments: [ {{ provider: p }} ] }} }}\nkeys:\n{line}\n"),
            &[],
        );
        assert_eq!(code, 0, "{name:?}: {line}\n{err}");
        let docs = yaml_rust2::YamlLoader::load_from_str(line.trim()).unwrap();
        assert_eq!(docs[0][0]["name"].as_str(), Some(name), "{line}");
    }
}

/// The config is `--config`, else `$SWITCHYARD_CONFIG`, else `routes.yaml` in the working
/// folder: three files with one route each tell which was read.
#[test]
fn the_config_is_the_flag_else_the_environment_else_routes_yaml_here() {
    let dir = tempfile::tempdir().unwrap();
    let write = |file: &str, route: &str| {
        let path = dir.path().join(file);
        std::fs::write(
            &path,
            format!("providers:\n  p: {{ kind: mock }}\nmodels:\n  {route}: {{ deployments: [ {{ provider: p }} ] }}\n"),
        )
        .unwrap();
        path.display().to_string()
    };
    write("routes.yaml", "from-working-folder");
    let env_file = write("env.yaml", "from-environment");
    let flag_file = write("flag.yaml", "from-flag");
    let check = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["check"];
        all.extend_from_slice(args);
        let (code, out, err) = switchyard_in(Some(dir.path()), &all, env);
        assert_eq!(code, 0, "{err}");
        out
    };
    let env = [("SWITCHYARD_CONFIG", env_file.as_str())];
    assert!(check(&["--config", &flag_file], &env).contains("from-flag"));
    assert!(check(&[], &env).contains("from-environment"));
    assert!(check(&[], &[]).contains("from-working-folder"));
}

/// A timeout of 0 would fail every attempt at once: `check` refuses it where it is written,
/// under `routing` or on a route; a `replica_timeout` shorter than a reconnection to Redis
/// may take would take live replicas for stopped.
#[test]
fn check_refuses_a_zero_timeout_where_it_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err, p) = check_text(
        &dir,
        "\
routing: { connect_timeout: 0s }
state: { replica_timeout: 4s }
providers:
  demo: { kind: mock }
models:
  a: { timeout: 0ms, first_token_timeout: 5s, deployments: [ { provider: demo } ] }
",
        &[],
    );
    assert_ne!(code, 0);
    for e in [
        format!("{p}:1:29: routing.connect_timeout must be longer than 0"),
        format!("{p}:6:17: route `a`: timeout must be longer than 0"),
        format!("{p}:2:27: state.replica_timeout must be at least 5s"),
    ] {
        assert!(err.contains(&e), "missing `{e}` in:\n{err}");
    }
    assert!(!err.contains("first_token_timeout"), "{err}");
}

/// A duration past ten years is refused where it is written: `check` panicked on
/// 99999999999999999999h, and passed 3000000000000000h, on which every request panicked
/// (the deadline overflowed the clock) and its connection dropped without an answer.
#[test]
fn check_refuses_a_duration_longer_than_the_clock_can_add() {
    let dir = tempfile::tempdir().unwrap();
    for (field, value, col) in [
        ("timeout", "99999999999999999999h", 17),
        ("cooldown", "3000000000000000h", 18),
        ("cache: { ttl", "87601h", 22),
    ] {
        let close = if field.starts_with("cache") { " }" } else { "" };
        let (code, out, err, p) = check_text(
            &dir,
            &format!(
                "providers:\n  demo: {{ kind: mock }}\nmodels:\n  a: {{ {field}: {value}{close}, \
                 first_token_timeout: 87600h, deployments: [ {{ provider: demo }} ] }}\n"
            ),
            &[],
        );
        assert_eq!(code, 1, "{out}{err}");
        let e = format!("{p}:4:{col}: ");
        assert!(
            err.lines().any(|l| l.starts_with(&e)
                && l.contains(&format!("`{value}` is longer than any duration"))),
            "missing `{e}` for {value} in:\n{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn check_refuses_a_negative_price_and_takes_a_price_per_character() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err, p) = check_text(
        &dir,
        "\
providers:
  demo: { kind: mock }
models:
  tts: { pricing: { per_1m_characters: 15 }, deployments: [ { provider: demo } ] }
  whisper: { pricing: { per_audio_second: -0.0001 }, deployments: [ { provider: demo } ] }
  dalle: { pricing: { image_sizes: { standard: { 1024x1024: 0.04 } } }, deployments: [ { provider: demo } ] }
  hd: { pricing: { image_sizes: { hd: { 1024x1024: -1 } } }, deployments: [ { provider: demo } ] }
",
        &[],
    );
    assert_ne!(code, 0);
    // Two errors, at the whisper and hd routes' pricing (lines 5, 7): the other fields are known.
    for line in ["5:23", "7:18"] {
        assert!(
            err.contains(&format!("{p}:{line}: prices must be numbers >= 0")),
            "{err}"
        );
    }
    assert!(err.contains(": 2 error(s)"), "{err}");
}

/// An unquoted `${VAR}` of digits reads as a number; where a string (a secret) is expected,
/// `check` says so without printing the value.
#[test]
fn a_type_error_in_a_value_from_the_environment_does_not_print_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err, p) = check_text(
        &dir,
        "\
server:
  admin_key: ${ADMIN_KEY}
providers:
  demo: { kind: mock }
models:
  a: { deployments: [ { provider: demo } ] }
",
        &[("ADMIN_KEY", "918273645546372819")],
    );
    assert_ne!(code, 0);
    assert!(
        !format!("{out}{err}").contains("918273645546372819"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{p}:2:14: server.admin_key: invalid type: integer (the value from the environment), expected a string"
        )),
        "{err}"
    );
    // Written in the file, the value is shown as before.
    let (_, _, err, _) = check_text(&dir, "server: { admin_key: 1234 }\n", &[]);
    assert!(err.contains("invalid type: integer `1234`"), "{err}");
}

/// Inside a provider (read by its `kind`), a type error names the field and its line, and a
/// value from the environment is not printed (an unquoted `${VLLM_TOKEN}` of digits was,
/// as `providers.vllm: invalid type: integer `918273645501`` at the `kind:` line, by
/// `check`, in the log of `serve` and in the answer of `/admin/reload`); a float too.
#[test]
fn a_type_error_inside_a_provider_names_its_field_and_hides_a_value_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    for (token, shown) in [
        ("918273645501", "integer"),
        ("31415926e12", "floating point"),
    ] {
        let (code, out, err, p) = check_text(
            &dir,
            "\
providers:
  vllm:
    kind: openai
    base_url: http://127.0.0.1:9/v1
    api_key: ${VLLM_TOKEN}
models:
  a: { deployments: [ { provider: vllm, deployment: m } ] }
",
            &[("VLLM_TOKEN", token)],
        );
        assert_ne!(code, 0);
        let all = format!("{out}{err}");
        assert!(!all.contains(token) && !all.contains("3.1415926"), "{all}");
        assert!(
            err.contains(&format!(
                "{p}:5:14: providers.vllm.api_key: invalid type: {shown} (the value from the environment), expected a string"
            )),
            "{err}"
        );
    }
    // A misspelt field whose value is from the environment: the field's name is no secret.
    let (_, _, err, _) = check_text(
        &dir,
        "providers:\n  vllm:\n    kind: openai\n    base_url: http://127.0.0.1:9/v1\n    apikey: ${VLLM_TOKEN}\nmodels:\n  a: { deployments: [ { provider: vllm, deployment: m } ] }\n",
        &[("VLLM_TOKEN", "918273645501")],
    );
    assert!(
        err.contains("unknown field `apikey`") && !err.contains("918273645501"),
        "{err}"
    );
    // Written in the file: the field and its line, the value shown.
    let (_, _, err, p) = check_text(
        &dir,
        "providers:\n  demo:\n    kind: mock\n    latency: 20\nmodels:\n  a: { deployments: [ { provider: demo } ] }\n",
        &[],
    );
    assert!(
        err.contains(&format!(
            "{p}:4:14: providers.demo.latency: invalid type: integer `20`"
        )),
        "{err}"
    );
}

/// Nested aliases ("billion laughs": a few hundred bytes that copy out to billions of values)
/// are refused where the bound is passed, at once (six levels took `check` 720 MB and two
/// seconds, seven 3 GB, nine aborted a serving gateway at its reload); shared blocks of a
/// real config still work.
#[test]
fn nested_aliases_that_expand_without_end_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut laughs = String::from("x-a:\n  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..=9 {
        let prev = format!("*a{}", i - 1);
        laughs += &format!("  a{i}: &a{i} [{}]\n", vec![prev; 10].join(", "));
    }
    let (code, _, err, p) = check_text(&dir, &laughs, &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("{p}:6:")) && err.contains("copy out more than 100000 values"),
        "{err}"
    );
    // One long string aliased many times (180 KB of file took check past 3 GB).
    let long = format!(
        "x-a: &a {}\nx-b: [{}]\n",
        "y".repeat(100_000),
        vec!["*a"; 20_000].join(", ")
    );
    let (code, _, err, _) = check_text(&dir, &long, &[]);
    assert_ne!(code, 0);
    assert!(err.contains("16 MiB of text"), "{err}");
    let (code, out, err, _) = check_text(
        &dir,
        "\
providers:
  demo: { kind: mock }
models:
  a: { deployments: [ &demo { provider: demo, weight: 2 } ] }
  b: { deployments: [ *demo, *demo ] }
",
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
}

/// A value from the environment put in the wrong field (an upstream key as a `base_url`) is
/// refused without being printed (it was: `` `WSECRET_yy` is not an http(s) URL``); a webhook
/// that is not a URL is refused at `check` (it failed every alert later, unsaid why).
#[test]
fn a_meaning_error_in_a_value_from_the_environment_does_not_print_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err, p) = check_text(
        &dir,
        "\
providers:
  up: { kind: openai, base_url: \"${UPSTREAM_KEY}\" }
models:
  a: { deployments: [ { provider: up, deployment: gpt-4o } ] }
alerts:
  webhook: ${HOOK}
",
        &[
            ("UPSTREAM_KEY", "sk-wrong-field-7f3a9c"),
            ("HOOK", "TOKEN-not-a-url"),
        ],
    );
    assert_ne!(code, 0);
    let all = format!("{out}{err}");
    assert!(
        !all.contains("sk-wrong-field-7f3a9c") && !all.contains("TOKEN-not-a-url"),
        "{all}"
    );
    assert!(
        err.contains(&format!(
            "{p}:2:33: providers.up.base_url: (the value from the environment) is not an http(s) URL"
        )),
        "{err}"
    );
    assert!(
        err.contains("alerts.webhook is not an http(s) URL"),
        "{err}"
    );
    // Empty (`${ALERT_WEBHOOK_URL:-}` unset): alerts are only logged, as documented.
    let (code, _, err, _) = check_text(
        &dir,
        "providers:\n  demo: { kind: mock }\nmodels:\n  a: { deployments: [ { provider: demo } ] }\nalerts:\n  webhook: ${HOOK:-}\n",
        &[],
    );
    assert_eq!(code, 0, "{err}");
}

/// A deployment named as its model, a model the built-in table does not price (an Azure
/// habit): `check` warns that it costs 0; it took the price of the model its name starts with
/// (`gpt-35-turbo-16k` as `gpt-35-turbo`, 6x under, before it had its own entry) unsaid. Without `model:`, a deployment
/// named after a priced model keeps its price.
#[test]
fn a_deployment_named_as_its_unpriced_model_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err, _) = check_text(
        &dir,
        "\
providers:
  az: { kind: azure_openai, endpoint: \"https://x.openai.azure.com\", api_key: k, api_version: 2024-10-21 }
models:
  old: { deployments: [ { provider: az, deployment: gpt-4o-search-preview, model: gpt-4o-search-preview } ] }
  prod: { deployments: [ { provider: az, deployment: gpt-4o-prod } ] }
",
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("route `old`: no built-in price for model `gpt-4o-search-preview`"),
        "{err}"
    );
    assert!(!err.contains("route `prod`"), "{err}");
}

/// A base URL with a query, a fragment or a space is refused: the operation's path would be
/// added after the query (`…?key=x/chat/completions`), and a space is taken out silently.
#[test]
fn a_base_url_with_a_query_or_a_space_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        "http://127.0.0.1:9/v1?key=abc",
        "http://127.0.0.1:9/v1#x",
        "http://127.0.0.1:9/v1 extra",
    ] {
        let (code, _, err, _) = check_text(
            &dir,
            &format!(
                "providers:\n  up: {{ kind: openai, base_url: \"{url}\" }}\nmodels:\n  a: {{ deployments: [ {{ provider: up, deployment: m }} ] }}\n"
            ),
            &[],
        );
        assert_ne!(code, 0, "{url}: {err}");
        assert!(
            err.contains("providers.up.base_url must be a base URL without spaces, query"),
            "{url}: {err}"
        );
    }
}

/// `check` refuses the state URLs `serve` would refuse at start, without printing them.
#[test]
fn check_refuses_state_urls_that_serve_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let base = "providers:\n  demo: { kind: mock }\nmodels:\n  a: { deployments: [ { provider: demo } ] }\n";
    for (state, error) in [
        (
            r#"{ redis: "REDISPASS-notaurl" }"#,
            "state.redis must be a redis:// or rediss:// URL",
        ),
        (
            r#"{ redis: "http://:REDISPASS@localhost:6379" }"#,
            "state.redis must be a redis:// or rediss:// URL",
        ),
        (
            r#"{ ledger: "postgres://u:REDISPASS@localhost/db?sslmode=bogus" }"#,
            "state.ledger: unknown value \"bogus\" for `ssl_mode`",
        ),
    ] {
        let (code, out, err, p) = check_text(&dir, &format!("state: {state}\n{base}"), &[]);
        assert_ne!(code, 0, "{state}: {out}");
        assert!(
            err.contains(&format!("{p}:1:")) && err.contains(error),
            "{state}: {err}"
        );
        assert!(!err.contains("REDISPASS"), "{err}");
    }
    let (code, out, err, _) = check_text(
        &dir,
        &format!("state: {{ redis: \"rediss://:pw@localhost:6380/1\", ledger: \"postgres://u:pw@localhost/db?sslmode=require\" }}\n{base}"),
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
}

/// A user name or password in a provider's URL is refused (it was sent nowhere and showed in
/// debug logs), and no message prints it.
#[test]
fn check_refuses_a_password_in_a_provider_url_without_printing_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err, _) = check_text(
        &dir,
        "\
providers:
  a: { kind: openai, base_url: \"http://user:pw-LEAK1@127.0.0.1:8000/v1\" }
  b: { kind: openai, base_url: \"user:pw-LEAK2@host/v1\" }
  d: { kind: openai, base_url: \"user:pw#LEAK4/x@host/v1\" }
  c: { kind: azure_openai, endpoint: \"https://:pw-LEAK3@x.openai.azure.com\", api_key: k }
models:
  m: { pricing: { input_per_1m: 0 }, deployments: [ { provider: a } ] }
",
        &[],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("providers.a.base_url must not hold a user name or password"),
        "{err}"
    );
    assert!(err.contains("providers.c.endpoint must not hold"), "{err}");
    assert!(err.contains("`***@host/v1` is not an http(s) URL"), "{err}");
    assert!(!format!("{out}{err}").contains("LEAK"), "{out}{err}");
}

/// A SIGHUP while the gateway starts does not end it (its default action would); and a
/// PostgreSQL ledger that cannot be reached is reported by its cause, not as a pool timeout.
#[test]
fn a_sighup_at_start_is_no_exit_and_an_unreachable_ledger_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    // Nothing listens on port 1: every connection is refused, for the 10 s the gateway waits.
    std::fs::write(
        &path,
        "state: { ledger: \"postgres://postgres@127.0.0.1:1/none\" }\nproviders: { demo: { kind: mock } }\nmodels: { m: { deployments: [ { provider: demo } ] } }\n",
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let killed = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Ended by its own error, not by the signal.
    assert_eq!(out.status.code(), Some(1), "{:?}: {text}", out.status);
    assert!(text.contains("Connection refused"), "{text}");
}

/// `switchyard check | head -1`: the command ends quietly when its reader goes away (it
/// panicked on the write).
#[test]
fn check_ends_quietly_when_its_reader_goes_away() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    let mut text = String::from("providers: { p: { kind: mock } }\nmodels:\n");
    for i in 0..5000 {
        text.push_str(&format!(
            "  r{i}: {{ deployments: [ {{ provider: p }} ] }}\n"
        ));
    }
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config", path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.ends_with(": ok\n"), "{first}");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}
