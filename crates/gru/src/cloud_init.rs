//! `gru cloud-init render`: fills in the minion user-data template
//! (`cloud-init/minion.yaml.tmpl`, compiled in) and, when the operator adds
//! parts of their own, wraps everything in a multipart MIME message.
//!
//! The template has `{{name}}` placeholders and no logic. Every value is
//! escaped for the one place it goes (a shell word here, minion.toml by the
//! toml crate, a YAML block), so no value can break out of it. A placeholder
//! alone on its line takes a block of lines, each indented like the
//! placeholder (an empty block removes the line); any other placeholder
//! takes one line.
//!
//! Multipart order: the operator's parts first, in the order given, gru's
//! cloud-config last. cloud-init merges cloud-config parts in order, and
//! gru's part carries `merge_how: list(append) + dict(no_replace,
//! recurse_list)`, so it adds to the operator's keys and never replaces
//! them; its `runcmd` (which starts the agent) lands after theirs. Shell
//! script parts are named `part-NNN-…`, which sorts before cloud-init's
//! `runcmd` script, so an engine installer runs before the agent starts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use base64::Engine as _;
use clap::{Args, Subcommand};

use crate::config_files::{self, MinionAws, MinionEngine, MinionFile};

const TEMPLATE: &str = include_str!("../../../cloud-init/minion.yaml.tmpl");
const MINION_UNIT: &str = include_str!("../../../deploy/systemd/gru-minion.service");

/// Where the bootstrap installs gru and where the unit runs it from.
const INSTALLED_BINARY: &str = "/usr/local/bin/gru";
const CA_PATH: &str = "/etc/gru/ca.pem";
const DEFAULT_JOIN_TOKEN_FILE: &str = "/etc/gru/join-token";
/// The agent's key and certificate: gru-minion.service's StateDirectory.
const MINION_STATE_DIR: &str = "/var/lib/gru/minion";
const DEFAULT_CONTROLLER_PORT: u16 = 7070;
const DEFAULT_ENGINE_PORT: u16 = 2575;
const DEFAULT_MAX_CONNECTION_AGE: &str = "5m";
/// Rendered into minion.toml; gru-minion.service's TimeoutStopSec (90s)
/// leaves this plus a margin.
const STOP_GRACE: &str = "60s";
/// EC2 refuses larger user-data (before base64).
const EC2_USER_DATA_LIMIT: usize = 16 * 1024;
const BOUNDARY: &str = "==gru-user-data==";

#[derive(Subcommand)]
pub enum CloudInitCommand {
    /// Render the minion user-data (#cloud-config, or multipart MIME with --part).
    Render(RenderArgs),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("binary").required(true).args(["binary_url", "package", "cloudformation"])))]
pub struct RenderArgs {
    /// The fleet the minions join.
    #[arg(long, required_unless_present = "cloudformation")]
    fleet: Option<String>,
    /// The controller's gRPC address: host:port or https://host:port.
    #[arg(long, required_unless_present = "cloudformation")]
    controller: Option<String>,
    /// The name on the controller's certificate (default: the controller's host).
    #[arg(long)]
    server_name: Option<String>,
    /// Download gru from this https:// URL or s3:// object (the instance
    /// role must be able to read it); needs --binary-sha256.
    #[arg(long, requires = "binary_sha256")]
    binary_url: Option<String>,
    /// The SHA-256 of the gru binary, 64 hex digits. The boot fails if the
    /// binary does not match.
    #[arg(long)]
    binary_sha256: Option<String>,
    /// gru is already in the image (baked into the AMI) at this path.
    #[arg(long, value_name = "PATH", conflicts_with = "binary_url")]
    package: Option<String>,
    /// The controller's CA certificate (PEM, public), written to
    /// /etc/gru/ca.pem. Without it the image must already have that file.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// The port the engine listens on (the load balancer's target port).
    #[arg(long, default_value_t = DEFAULT_ENGINE_PORT)]
    engine_port: u16,
    /// Where the engine forwards messages (IP:port).
    #[arg(long, required_unless_present = "cloudformation")]
    downstream: Option<String>,
    /// Close each inbound connection at a message boundary after this age.
    #[arg(long, default_value = DEFAULT_MAX_CONNECTION_AGE)]
    max_connection_age: String,
    /// Join with a token read from this file, provisioned out of band (not
    /// in user-data), instead of the instance's signed identity document
    /// (the default; the controller's fleet needs [fleet.identity]).
    #[arg(long, value_name = "PATH")]
    join_token_file: Option<String>,
    /// Join with a token fetched at boot from this SSM SecureString
    /// parameter with the instance role (needs the AWS CLI in the image),
    /// into --join-token-file (default /etc/gru/join-token).
    #[arg(long, value_name = "NAME")]
    join_token_ssm_parameter: Option<String>,
    /// A user-data part of your own (#cloud-config, #!script, #cloud-boothook,
    /// #include); repeatable. Makes the output multipart MIME, gru's part last.
    #[arg(long = "part", value_name = "FILE")]
    parts: Vec<PathBuf>,
    /// Emit CloudFormation `Fn::Sub` placeholders (${FleetName}, …) instead of
    /// values: the launch template user-data of deploy/cloudformation/gru.yaml.
    #[arg(long, conflicts_with_all = ["fleet", "controller", "downstream", "ca_file", "parts", "package"])]
    cloudformation: bool,
    /// Write here instead of standard output.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

pub fn run(command: CloudInitCommand) -> anyhow::Result<()> {
    match command {
        CloudInitCommand::Render(args) => {
            let text = render(&args)?;
            if text.len() > EC2_USER_DATA_LIMIT {
                eprintln!(
                    "warning: the user-data is {} bytes; EC2 accepts at most {EC2_USER_DATA_LIMIT}",
                    text.len()
                );
            }
            match &args.output {
                Some(path) => std::fs::write(path, &text)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(())
        }
    }
}

/// The values that go into the template, each already escaped for its place.
fn render(args: &RenderArgs) -> anyhow::Result<String> {
    let vars = if args.cloudformation {
        cloudformation_vars(args)?
    } else {
        values(args)?
    };
    let cloud_config = fill(TEMPLATE, &vars)?;
    if args.cloudformation {
        return Ok(escape_for_sub(&cloud_config, &vars));
    }
    if args.parts.is_empty() {
        return Ok(cloud_config);
    }
    let mut parts = Vec::new();
    for (i, path) in args.parts.iter().enumerate() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read part {}", path.display()))?;
        let content_type = part_type(&text)
            .with_context(|| format!("cannot tell what kind of user-data {} is", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        parts.push(Part {
            content_type,
            filename: format!("part-{:03}-{}", i + 1, sanitize_filename(&name)),
            text,
        });
    }
    parts.push(Part {
        content_type: "text/cloud-config",
        filename: "gru-minion.yaml".to_owned(),
        text: cloud_config,
    });
    multipart(&parts)
}

fn values(args: &RenderArgs) -> anyhow::Result<BTreeMap<&'static str, String>> {
    let fleet = args.fleet.as_deref().unwrap_or_default();
    ensure!(
        !fleet.is_empty()
            && fleet
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
        "--fleet: letters, digits, '-', '_' or '.', got {fleet:?}"
    );
    let (controller, host) = controller_url(args.controller.as_deref().unwrap_or_default())?;
    let server_name = args.server_name.clone().unwrap_or(host);
    ensure!(
        !server_name.is_empty() && server_name.chars().all(|c| c.is_ascii_graphic()),
        "--server-name: a DNS name or IP address, got {server_name:?}"
    );
    let downstream = args.downstream.as_deref().unwrap_or_default();
    downstream.parse::<std::net::SocketAddr>().map_err(|_| {
        anyhow::anyhow!("--downstream: an address like 10.0.2.5:2576, got {downstream:?}")
    })?;
    humantime::parse_duration(&args.max_connection_age).map_err(|_| {
        anyhow::anyhow!(
            "--max-connection-age: a duration like \"5m\", got {:?}",
            args.max_connection_age
        )
    })?;
    ensure!(args.engine_port != 0, "--engine-port: 1..=65535");
    let token_file = token_file(args)?;
    if let Some(sha) = &args.binary_sha256 {
        ensure!(
            sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()),
            "--binary-sha256: 64 hex digits, got {sha:?}"
        );
    }
    if let Some(url) = &args.binary_url {
        ensure!(
            (url.starts_with("https://") || url.starts_with("s3://"))
                && url.chars().all(|c| c.is_ascii_graphic()),
            "--binary-url: an https:// URL or an s3:// object without spaces, got {url:?}"
        );
        ensure!(
            !url.contains('@') && !url.contains("X-Amz-Signature") && !url.contains("Signature="),
            "--binary-url: {url:?} carries credentials; user-data must hold no secret (use an s3:// object the instance role can read)"
        );
    }
    if let Some(path) = &args.package {
        ensure!(
            path.starts_with('/'),
            "--package: the absolute path of gru in the image, got {path:?}"
        );
    }
    if let Some(name) = &args.join_token_ssm_parameter {
        ensure!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_graphic()),
            "--join-token-ssm-parameter: a parameter name, got {name:?}"
        );
    }

    let toml = minion_toml(&MinionToml {
        controller: &controller,
        server_name: &server_name,
        fleet,
        join_token_file: token_file.as_deref(),
        engine_port: &args.engine_port.to_string(),
        downstream,
        max_connection_age: &args.max_connection_age,
    })?;
    // Whatever is rendered must load as the agent loads it.
    gru_minion::MinionConfig::parse(Path::new("/etc/gru/minion.toml"), &toml)
        .map_err(|e| anyhow::anyhow!("{}", gru_minion::error_chain(&e)))
        .context("the rendered minion config does not load")?;

    let ca_file_entry = match &args.ca_file {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
            ensure!(
                pem.contains("-----BEGIN CERTIFICATE-----"),
                "--ca-file: {} holds no PEM certificate",
                path.display()
            );
            ensure!(
                !pem.contains("PRIVATE KEY"),
                "--ca-file: {} holds a private key; user-data must hold no secret",
                path.display()
            );
            ca_entry(&base64::engine::general_purpose::STANDARD.encode(pem.as_bytes()))
        }
        None => String::new(),
    };

    Ok(BTreeMap::from([
        ("minion_toml", toml),
        ("ca_file_entry", ca_file_entry),
        ("minion_unit", MINION_UNIT.trim_end().to_owned()),
        (
            "binary_url",
            shell_word(args.binary_url.as_deref().unwrap_or("")),
        ),
        (
            "binary_sha256",
            shell_word(
                &args
                    .binary_sha256
                    .as_deref()
                    .unwrap_or("")
                    .to_ascii_lowercase(),
            ),
        ),
        (
            "binary_path",
            shell_word(args.package.as_deref().unwrap_or(INSTALLED_BINARY)),
        ),
        (
            "join_token_file",
            shell_word(token_file.as_deref().unwrap_or("")),
        ),
        (
            "join_token_ssm_parameter",
            shell_word(args.join_token_ssm_parameter.as_deref().unwrap_or("")),
        ),
        ("engine_port", args.engine_port.to_string()),
    ]))
}

/// The same template with CloudFormation parameters where the values go
/// (their AllowedPattern in gru.yaml keeps quotes and newlines out).
fn cloudformation_vars(args: &RenderArgs) -> anyhow::Result<BTreeMap<&'static str, String>> {
    // The stack's minions join with their identity documents: no token.
    ensure!(
        args.join_token_file.is_none() && args.join_token_ssm_parameter.is_none(),
        "--cloudformation: the stack's minions join with their identity documents; no --join-token-*"
    );
    let toml = minion_toml(&MinionToml {
        controller: &format!("https://${{Controller.PrivateIp}}:{DEFAULT_CONTROLLER_PORT}"),
        server_name: "${ControllerServerName}",
        fleet: "${FleetName}",
        join_token_file: None,
        engine_port: "${EnginePort}",
        downstream: "${Downstream}",
        max_connection_age: &args.max_connection_age,
    })?;
    // The stack names one controller or a list of two (its Fn::Sub
    // variable ControllerUrls, already TOML): the value goes in unquoted.
    let one =
        format!("controller = \"https://${{Controller.PrivateIp}}:{DEFAULT_CONTROLLER_PORT}\"");
    ensure!(
        toml.contains(&one),
        "the minion config has no line {one:?} to put the stack's controllers in"
    );
    let toml = toml.replacen(&one, "controller = ${ControllerUrls}", 1);
    Ok(BTreeMap::from([
        ("minion_toml", toml),
        (
            "ca_file_entry",
            ca_entry("${ControllerCaCertificateBase64}"),
        ),
        ("minion_unit", MINION_UNIT.trim_end().to_owned()),
        ("binary_url", "'${GruBinaryUrl}'".to_owned()),
        ("binary_sha256", "'${GruBinarySha256}'".to_owned()),
        ("binary_path", shell_word(INSTALLED_BINARY)),
        ("join_token_file", shell_word("")),
        ("join_token_ssm_parameter", shell_word("")),
        ("engine_port", "${EnginePort}".to_owned()),
    ]))
}

/// Where the agent reads its join token: `None` when it joins with the
/// instance's identity document. The path goes into the bootstrap as a
/// shell word inside a YAML block, where a line break (`\n`, and `\r` for
/// YAML) would end it.
fn token_file(args: &RenderArgs) -> anyhow::Result<Option<String>> {
    let path = match (&args.join_token_file, &args.join_token_ssm_parameter) {
        (Some(p), _) => p.clone(),
        (None, Some(_)) => DEFAULT_JOIN_TOKEN_FILE.to_owned(),
        (None, None) => return Ok(None),
    };
    ensure!(
        path.starts_with('/') && !path.chars().any(char::is_control),
        "--join-token-file: an absolute path on one line, got {path:?}"
    );
    Ok(Some(path))
}

/// `Fn::Sub` reads every `${…}`: keep the ones that are ours, turn any other
/// into a literal (`${!…}`).
fn escape_for_sub(text: &str, vars: &BTreeMap<&'static str, String>) -> String {
    let mut ours: Vec<&str> = Vec::new();
    for v in vars.values() {
        let mut rest = v.as_str();
        while let Some(i) = rest.find("${") {
            let end = rest[i..].find('}').map_or(rest.len(), |e| i + e + 1);
            ours.push(&rest[i..end]);
            rest = &rest[end..];
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if !ours.iter().any(|p| tail.starts_with(p)) {
            out.push_str("${!");
            rest = &tail[2..];
        } else {
            out.push_str("${");
            rest = &tail[2..];
        }
    }
    out.push_str(rest);
    out
}

fn ca_entry(base64_pem: &str) -> String {
    format!(
        "- path: {CA_PATH}\n  owner: root:root\n  permissions: \"0644\"\n  # The controller's CA certificate (PEM, base64): public, not a secret.\n  encoding: b64\n  content: {base64_pem}"
    )
}

const MINION_TOML_HEADER: &str = "\
gru minion agent config, written by `gru cloud-init render` into EC2
user-data; gru's deploy/minion.example.toml documents the keys.
identity: without join_token_file, the instance's signed identity document
(IMDSv2), accepted once; then the certificate the controller issued, kept
in state_dir. With --join-token-file the token is provisioned out of band,
never in user-data (an SSM SecureString read with the instance role at
boot, see --join-token-ssm-parameter).
stop_grace: gru-minion.service's TimeoutStopSec leaves this plus a margin.
[aws] imds: the instance id comes from the instance metadata (IMDSv2); in
a warm pool the engine starts but the agent joins only once the instance
is put in service.";

struct MinionToml<'a> {
    controller: &'a str,
    server_name: &'a str,
    fleet: &'a str,
    join_token_file: Option<&'a str>,
    engine_port: &'a str,
    downstream: &'a str,
    max_connection_age: &'a str,
}

/// The agent's config. The toml crate writes the values; what the file's
/// comments said beside their keys is in its header.
fn minion_toml(m: &MinionToml<'_>) -> anyhow::Result<String> {
    let file = MinionFile {
        controller: m.controller.to_owned(),
        server_name: Some(m.server_name.to_owned()),
        ca_file: CA_PATH.to_owned(),
        fleet: m.fleet.to_owned(),
        join_token_file: m.join_token_file.map(str::to_owned),
        state_dir: Some(MINION_STATE_DIR.to_owned()),
        stop_grace: Some(STOP_GRACE.to_owned()),
        metrics_listen: None,
        engine: MinionEngine {
            kind: Some("reference"),
            listen: format!("0.0.0.0:{}", m.engine_port),
            downstream: m.downstream.to_owned(),
            max_connection_age: m.max_connection_age.to_owned(),
        },
        aws: Some(MinionAws { imds: true }),
    };
    config_files::to_toml(MINION_TOML_HEADER, &file).context("cannot write the minion config")
}

/// `https://host:port` from `host`, `host:port` or `https://host[:port]`,
/// and the host alone (the default certificate name).
fn controller_url(s: &str) -> anyhow::Result<(String, String)> {
    ensure!(
        !s.starts_with("http://"),
        "--controller: gRPC is always TLS; use https:// or no scheme, got {s:?}"
    );
    let rest = s
        .strip_prefix("https://")
        .unwrap_or(s)
        .trim_end_matches('/');
    let bad = || anyhow::anyhow!("--controller: an address like 10.0.0.10:7070, got {s:?}");
    ensure!(
        !rest.is_empty()
            && rest
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '[' | ']')),
        bad()
    );
    let (host, port) = if let Some(h) = rest.strip_prefix('[') {
        // [v6]:port
        let (h, p) = h.split_once(']').ok_or_else(bad)?;
        (h.to_owned(), p.strip_prefix(':').unwrap_or(""))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_owned(), p),
            None => (rest.to_owned(), ""),
            Some(_) => bail!(bad()),
        }
    };
    let port: u16 = if port.is_empty() {
        DEFAULT_CONTROLLER_PORT
    } else {
        port.parse().map_err(|_| bad())?
    };
    ensure!(!host.is_empty(), bad());
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((format!("https://{authority}"), host))
}

/// A POSIX shell word that stays one word and expands nothing.
fn shell_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Fills `{{name}}` placeholders. Unknown or unused names are errors, so the
/// template and this code cannot drift apart silently.
fn fill(template: &str, vars: &BTreeMap<&'static str, String>) -> anyhow::Result<String> {
    let mut used = std::collections::BTreeSet::new();
    let mut out = String::with_capacity(template.len() * 2);
    for line in template.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if let Some(name) = trimmed
            .strip_prefix("{{")
            .and_then(|r| r.strip_suffix("}}"))
            .filter(|n| !n.contains('{') && !n.contains('}'))
        {
            let value = vars
                .get(name)
                .with_context(|| format!("template placeholder {{{{{name}}}}} has no value"))?;
            used.insert(name);
            for l in value.lines() {
                if l.is_empty() {
                    out.push('\n');
                } else {
                    out.push_str(indent);
                    out.push_str(l);
                    out.push('\n');
                }
            }
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            let end = rest[start..]
                .find("}}")
                .with_context(|| format!("unclosed placeholder in template line {line:?}"))?;
            let name = &rest[start + 2..start + end];
            let value = vars
                .get(name)
                .with_context(|| format!("template placeholder {{{{{name}}}}} has no value"))?;
            ensure!(
                !value.contains('\n'),
                "template placeholder {{{{{name}}}}} takes one line"
            );
            used.insert(name);
            out.push_str(&rest[..start]);
            out.push_str(value);
            rest = &rest[start + end + 2..];
        }
        out.push_str(rest);
        out.push('\n');
    }
    for name in vars.keys() {
        ensure!(
            used.contains(name),
            "the template has no placeholder {{{{{name}}}}}"
        );
    }
    Ok(out)
}

struct Part {
    content_type: &'static str,
    filename: String,
    text: String,
}

/// The MIME type cloud-init gives a part, from its first line (as
/// cloud-init itself decides for parts without a type).
fn part_type(text: &str) -> anyhow::Result<&'static str> {
    const STARTS: &[(&str, &str)] = &[
        ("#cloud-config-archive", "text/cloud-config-archive"),
        ("#cloud-config", "text/cloud-config"),
        ("#cloud-boothook", "text/cloud-boothook"),
        ("#include", "text/x-include-url"),
        ("#part-handler", "text/part-handler"),
        ("## template: jinja", "text/jinja2"),
        ("#!", "text/x-shellscript"),
    ];
    for (start, ty) in STARTS {
        if text.starts_with(start) {
            return Ok(ty);
        }
    }
    bail!("it starts with none of #cloud-config, #!, #cloud-boothook, #include, #part-handler")
}

fn sanitize_filename(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn multipart(parts: &[Part]) -> anyhow::Result<String> {
    let mut boundary = BOUNDARY.to_owned();
    let mut n = 0;
    while parts.iter().any(|p| p.text.contains(&boundary)) {
        n += 1;
        boundary = format!("{BOUNDARY}{n}");
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n"
    );
    for p in parts {
        let encoding = if p.text.is_ascii() { "7bit" } else { "8bit" };
        let _ = writeln!(
            out,
            "--{boundary}\nContent-Type: {}; charset=\"utf-8\"\nMIME-Version: 1.0\n\
             Content-Transfer-Encoding: {encoding}\n\
             Content-Disposition: attachment; filename=\"{}\"\n",
            p.content_type, p.filename
        );
        out.push_str(&p.text);
        if !p.text.ends_with('\n') {
            out.push('\n');
        }
    }
    let _ = writeln!(out, "--{boundary}--");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_do_not_break_out() {
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's $(x)"), r"'it'\''s $(x)'");
    }

    /// `gru cloud-init render` with these arguments.
    fn render_with(args: &[&str]) -> anyhow::Result<String> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            render: RenderArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(
            std::iter::once("render").chain(args.iter().copied()),
        )?;
        render(&cli.render)
    }

    const BAKED: [&str; 8] = [
        "--fleet",
        "hl7",
        "--controller",
        "10.0.0.10",
        "--package",
        "/usr/local/bin/gru",
        "--downstream",
        "10.0.2.5:2576",
    ];

    /// /etc/gru/minion.toml as cloud-init writes it from the user-data: the
    /// block under its `content: |`, without the block's indentation.
    fn written_minion_toml(user_data: &str) -> String {
        let entry = &user_data[user_data.find("path: /etc/gru/minion.toml").unwrap()..];
        let block = &entry[entry.find("content: |\n").unwrap() + "content: |\n".len()..];
        let mut out = String::new();
        for line in block.lines() {
            if line.is_empty() {
                out.push('\n');
            } else if let Some(l) = line.strip_prefix("      ") {
                out.push_str(l);
                out.push('\n');
            } else {
                break;
            }
        }
        out
    }

    #[test]
    fn minion_toml_keeps_quotes_backslashes_and_newlines() {
        let odd = "a\"b\\c\nd'e\u{7}f";
        let text = minion_toml(&MinionToml {
            controller: odd,
            server_name: odd,
            fleet: odd,
            join_token_file: Some(odd),
            engine_port: odd,
            downstream: odd,
            max_connection_age: odd,
        })
        .unwrap();
        let back: toml::Table = toml::from_str(&text).unwrap();
        for key in ["controller", "server_name", "fleet", "join_token_file"] {
            assert_eq!(back[key].as_str(), Some(odd), "{key}");
        }
        let engine = &back["engine"];
        assert_eq!(engine["listen"].as_str(), Some(&*format!("0.0.0.0:{odd}")));
        assert_eq!(engine["downstream"].as_str(), Some(odd));
        assert_eq!(engine["max_connection_age"].as_str(), Some(odd));
        assert_eq!(back["aws"]["imds"].as_bool(), Some(true));
        assert!(text.starts_with("# gru minion agent config"), "{text}");
    }

    #[test]
    fn rendered_minion_toml_keeps_the_quotes_and_backslashes_the_cli_takes() {
        // --server-name takes any printable ASCII and --join-token-file any
        // absolute path on one line.
        let server_name = r#"gru\ctl"1'"#;
        let token = r#"/etc/gru/the "join" token\x"#;
        let mut args = BAKED.to_vec();
        args.extend(["--server-name", server_name, "--join-token-file", token]);
        let user_data = render_with(&args).unwrap();

        let text = written_minion_toml(&user_data);
        let back: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(back["server_name"].as_str(), Some(server_name));
        assert_eq!(back["join_token_file"].as_str(), Some(token));
        assert_eq!(back["fleet"].as_str(), Some("hl7"));
        let config =
            gru_minion::MinionConfig::parse(Path::new("/etc/gru/minion.toml"), &text).unwrap();
        assert_eq!(config.server_name, server_name);
        assert_eq!(config.join_token_file.as_deref(), Some(Path::new(token)));
        assert!(
            user_data.contains(&format!("JOIN_TOKEN_FILE={}\n", shell_word(token))),
            "{user_data}"
        );
    }

    #[test]
    fn a_join_token_file_must_be_one_line() {
        for path in ["/etc/gru/join\ntoken", "/etc/gru/join\rtoken"] {
            let mut args = BAKED.to_vec();
            args.extend(["--join-token-file", path]);
            let e = render_with(&args).unwrap_err().to_string();
            assert!(
                e.contains("--join-token-file: an absolute path on one line"),
                "{e}"
            );
        }
        // The stack's minions take no token at all.
        let e = render_with(&["--cloudformation", "--join-token-file", "/etc/gru/t"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("join with their identity documents"), "{e}");
    }

    #[test]
    fn controller_addresses() {
        let ok = |s: &str| controller_url(s).expect(s);
        assert_eq!(
            ok("10.0.0.10"),
            ("https://10.0.0.10:7070".into(), "10.0.0.10".into())
        );
        assert_eq!(
            ok("https://ctl.internal:7443/"),
            ("https://ctl.internal:7443".into(), "ctl.internal".into())
        );
        assert_eq!(ok("[fd00::1]:7070").0, "https://[fd00::1]:7070");
        assert!(controller_url("http://10.0.0.10:7070").is_err());
        assert!(controller_url("10.0.0.10:x").is_err());
        assert!(controller_url("a\"b:1").is_err());
    }

    #[test]
    fn placeholders_fill_blocks_and_words() {
        let vars = BTreeMap::from([("a", "one".to_owned()), ("b", "x\n\ny".to_owned())]);
        assert_eq!(
            fill("k: {{a}}\n  {{b}}\n", &vars).unwrap(),
            "k: one\n  x\n\n  y\n"
        );
        assert!(fill("{{a}}\n", &vars).is_err(), "unused b");
        assert!(fill("{{a}} {{b}} {{c}}\n", &vars).is_err(), "unknown c");
    }

    #[test]
    fn sub_escaping_keeps_only_our_parameters() {
        let vars = BTreeMap::from([("a", "${FleetName}".to_owned())]);
        assert_eq!(
            escape_for_sub("${FleetName} ${HOME} $x", &vars),
            "${FleetName} ${!HOME} $x"
        );
    }

    #[test]
    fn part_types() {
        assert_eq!(part_type("#!/bin/sh\n").unwrap(), "text/x-shellscript");
        assert_eq!(part_type("#cloud-config\n").unwrap(), "text/cloud-config");
        assert!(part_type("hello").is_err());
    }
}
