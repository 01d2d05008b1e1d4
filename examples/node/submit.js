#!/usr/bin/env node
// Submit a task to the hivewire coordinator from Node.js and print its events.
//
// It loads the contracts at run time from the repository's proto/ directory (no code
// generation), connects over mutual TLS, calls CoordinatorService/StreamTask and prints
// one line per streamed event. The address and the certificate paths come from flags,
// or else from the .hivewire/endpoints.json that `hivewire up` writes. Given several
// coordinators (a comma-separated --address, or the "coordinators" list of
// endpoints.json), it uses the first that completes a connection: a dead one is skipped.
// When the coordinator goes away mid-stream, it watches the task on from the last event
// shown on the next coordinator that connects (or the same one once it is back).
//
// Run `node submit.js --help` for the flags. Exit codes: 0 the task succeeded; 1 it
// ended in another state; 2 the call failed (one line: status code name, the mesh's
// reason when it sent one, details); 3 bad usage.
"use strict";

const fs = require("node:fs");
const net = require("node:net");
const path = require("node:path");
const tls = require("node:tls");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const EXIT_SUCCEEDED = 0;
const EXIT_NOT_SUCCEEDED = 1;
const EXIT_RPC_ERROR = 2;
const EXIT_USAGE = 3;

const USAGE = `usage: node submit.js (--capability NAME | --plan FILE.json) [--text TEXT] [--json JSON]
                      [--address HOST:PORT] [--ca FILE --cert FILE --key FILE]
                      [--endpoints FILE] [--timeout SECONDS] [--proto DIR]

  --capability  the capability the task needs (calculate, solve, summarize...)
  --plan        run a multi-agent plan instead: a JSON file in the Plan shape
                ({"steps": [{"step_id", "capability", "input", "depends_on"}],
                "aggregation": "AGGREGATION_ALL"}); step events print as "step ..."
  --text        the input text; --json adds a JSON object input (both may be given)
  --address     the coordinator, or several comma-separated (the first that connects
                is used); default from endpoints.json, else 127.0.0.1:50051
  --connect-timeout  seconds one coordinator of several gets to connect (default 5)
  --ca/--cert/--key  the CA certificate and the client identity (PEM files)
  --endpoints   the endpoints.json to read; default: $HIVEWIRE_ENDPOINTS, then
                .hivewire/endpoints.json here, then the repository's
  --timeout     the task's timeout and the call's deadline (default 120)
  --proto       the proto/ directory (default: the repository's)

examples:
  node submit.js --capability calculate --text '2 + 3; 4 * 5'
  node submit.js --capability solve --json '{"expression": "p * q", "variables": {"p": 3, "q": 4}}'
  node submit.js --plan ../plans/fan-out.json
  node submit.js --capability calculate --text '6 * 7' --address 127.0.0.1:50051 \\
      --ca ../../certs/ca.pem --cert ../../certs/alice.pem --key ../../certs/alice.key

exit codes: 0 succeeded, 1 the task did not succeed, 2 the call failed, 3 bad usage`;

class UsageError extends Error {}

function options() {
  const { values } = parseArgs({
    options: {
      capability: { type: "string" },
      plan: { type: "string" },
      text: { type: "string", default: "" },
      json: { type: "string" },
      address: { type: "string" },
      ca: { type: "string" },
      cert: { type: "string" },
      key: { type: "string" },
      endpoints: { type: "string" },
      timeout: { type: "string", default: "120" },
      "connect-timeout": { type: "string", default: "5" },
      proto: { type: "string", default: path.resolve(__dirname, "..", "..", "proto") },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (Boolean(values.capability) === Boolean(values.plan)) {
    throw new UsageError("give --capability or --plan, not both (see --help)");
  }
  return values;
}

// Flags win; anything not given comes from endpoints.json when one is found.
function connectionSettings(opts) {
  const candidates = opts.endpoints
    ? [opts.endpoints]
    : [
        process.env.HIVEWIRE_ENDPOINTS,
        path.join(process.cwd(), ".hivewire", "endpoints.json"),
        path.resolve(__dirname, "..", "..", ".hivewire", "endpoints.json"),
      ].filter(Boolean);
  const found = candidates.find((file) => fs.existsSync(file));
  if (opts.endpoints && !found) {
    throw new UsageError(`no endpoints file at ${opts.endpoints}`);
  }
  const endpoints = found ? JSON.parse(fs.readFileSync(found, "utf8")) : {};
  const files = endpoints.tls || {};
  const listed = endpoints.coordinators?.length
    ? endpoints.coordinators.join(",")
    : endpoints.services?.coordinator?.address;
  const addresses = (opts.address || listed || "127.0.0.1:50051")
    .split(",")
    .map((a) => a.trim())
    .filter(Boolean);
  if (addresses.length === 0) throw new UsageError("--address names no coordinator");
  const settings = {
    addresses,
    ca: opts.ca || files.ca,
    // A certificate and its key always come from the same place.
    cert: opts.cert || (opts.key ? undefined : files.cert),
    key: opts.key || (opts.cert ? undefined : files.key),
  };
  if (!settings.ca) {
    throw new UsageError("no CA certificate: pass --ca or run `hivewire up` (endpoints.json)");
  }
  if (Boolean(settings.cert) !== Boolean(settings.key)) {
    throw new UsageError("--cert and --key go together");
  }
  return settings;
}

// Returns the channel credentials and the channel options.
function credentials(address, { ca, cert, key }) {
  const read = (file) => fs.readFileSync(file);
  const host = address.replace(/:\d+$/, "").replace(/^\[(.*)\]$/, "$1");
  // The server certificate is always checked against the host dialled...
  const verify = { checkServerIdentity: (_name, peer) => tls.checkServerIdentity(host, peer) };
  // ...but grpc-js would send that host as TLS SNI, and Node warns when it is an IP
  // address (RFC 6066 forbids it), so an IP target sends "localhost" as SNI instead.
  const options = net.isIP(host) ? { "grpc.ssl_target_name_override": "localhost" } : {};
  // Without cert and key this is server-authenticated TLS only: the mesh refuses it.
  const creds = grpc.credentials.createSsl(
    read(ca),
    key ? read(key) : null,
    cert ? read(cert) : null,
    verify,
  );
  return [creds, options];
}

function loadCoordinator(protoDir) {
  const definition = protoLoader.loadSync("hivewire/coordinator/v1/coordinator.proto", {
    // google/protobuf/{timestamp,duration,struct}.proto are bundled inside protobufjs
    // (proto-loader's parser); its directory holds the other well-known types.
    includeDirs: [protoDir, path.dirname(require.resolve("protobufjs/package.json"))],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).hivewire.coordinator.v1;
}

// google.protobuf.Struct <-> plain JavaScript values. protobufjs defines the bundled
// well-known types with camelCase field names, whatever keepCase says.
function toValue(v) {
  if (v === null || v === undefined) return { nullValue: "NULL_VALUE" };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  switch (typeof v) {
    case "number":
      return { numberValue: v };
    case "boolean":
      return { boolValue: v };
    case "object":
      return { structValue: toStruct(v) };
    default:
      return { stringValue: String(v) };
  }
}
function toStruct(object) {
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, toValue(v)])) };
}
function fromValue(v) {
  if (v.kind === "structValue") return fromStruct(v.structValue);
  if (v.kind === "listValue") return (v.listValue.values || []).map(fromValue);
  return v.kind === "nullValue" ? null : v[v.kind];
}
function fromStruct(struct) {
  return Object.fromEntries(Object.entries(struct.fields || {}).map(([k, v]) => [k, fromValue(v)]));
}

const state = (s) => String(s).replace(/^TASK_STATE_/, "");
const errorText = (e) => (e ? `${e.reason || e.code}: ${e.message}` : "");
function payloadText(p) {
  if (!p) return "";
  if (p.text) return p.text;
  if (p.json) return JSON.stringify(fromStruct(p.json));
  return p.data && p.data.length ? `<${p.data.length} bytes ${p.content_type}>` : "";
}

function describe(event) {
  const kind = event.kind;
  const body = event[kind];
  switch (kind) {
    case "snapshot":
      return `task ${body.task_id} ${state(body.state)}`;
    case "state_changed":
      return `${state(body.from_state)} -> ${state(body.to_state)} ${body.reason}`.trim();
    case "progress":
      return `${Math.round(body.fraction * 100)}% ${body.step}: ${body.message}`;
    case "partial":
      return payloadText(body.content);
    case "input_required":
      return `${body.prompt} (answer with ProvideInput, request ${body.request_id})`;
    case "activity": {
      const what = body.kind.replace(/^ACTIVITY_KIND_/, "");
      return `${what} ${body.name} ${body.done ? "done" : "started"}`;
    }
    case "retry":
      return `attempt ${body.failed_attempt} failed: ${errorText(body.error)}`;
    case "step": {
      const what = String(body.kind).replace(/^STEP_EVENT_KIND_/, "").toLowerCase();
      const detail = body.progress ? ` ${Math.round(body.progress.fraction * 100)}%` : "";
      return `${body.step_id} ${what} ${state(body.state)}${detail} ${errorText(body.error)}`.trim();
    }
    case "finished":
      return `${state(body.state)} ${errorText(body.error)}`.trim();
    default:
      return "";
  }
}

// The mesh puts a google.rpc.Status with an ErrorInfo (whose reason clients branch on)
// in the grpc-status-details-bin trailer; decode just the fields needed here.
const rpcTypes = protobuf.parse(`syntax = "proto3";
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; }`, { keepCase: true }).root;
function reasonOf(err) {
  const [raw] = err.metadata ? err.metadata.get("grpc-status-details-bin") : [];
  if (!raw) return "";
  try {
    const status = rpcTypes.lookupType("Status").decode(raw);
    const info = status.details.find((d) => d.type_url.endsWith("/google.rpc.ErrorInfo"));
    return info ? rpcTypes.lookupType("ErrorInfo").decode(info.value).reason : "";
  } catch {
    return "";
  }
}

// A plan file in the Plan shape; step inputs may be plain strings (their text) or
// {text, json} objects.
function readPlan(file) {
  let plan;
  try {
    plan = JSON.parse(fs.readFileSync(file, "utf8"));
  } catch (err) {
    throw new UsageError(`cannot read the plan ${file}: ${err.message}`);
  }
  if (!plan || !Array.isArray(plan.steps)) {
    throw new UsageError(`the plan ${file} has no list of steps`);
  }
  const payload = (input) => {
    if (input === undefined || input === null) return undefined;
    if (typeof input === "string") return { text: input };
    const out = { text: input.text || "" };
    if (input.json) out.json = toStruct(input.json);
    return out;
  };
  return {
    aggregation: plan.aggregation || "AGGREGATION_ALL",
    aggregator_capability: plan.aggregator_capability || "",
    steps: plan.steps.map((step) => ({
      step_id: step.step_id,
      capability: step.capability,
      input: payload(step.input),
      depends_on: step.depends_on || [],
      compensation_capability: step.compensation_capability || "",
    })),
  };
}

// Whether the client's channel completes a connection (TCP and the TLS handshake)
// before it fails or the deadline passes.
function connects(client, deadline) {
  const channel = client.getChannel();
  const { READY, TRANSIENT_FAILURE, SHUTDOWN } = grpc.connectivityState;
  return new Promise((resolve) => {
    const check = () => {
      const state = channel.getConnectivityState(true);
      if (state === READY) return resolve(true);
      if (state === TRANSIENT_FAILURE || state === SHUTDOWN) return resolve(false);
      channel.watchConnectivityState(state, deadline, (err) => (err ? resolve(false) : check()));
    };
    check();
  });
}

// The first coordinator that connects, in the order given: { client, address }. With one
// address nothing is probed; when none connects, the first is used and the call reports
// the transport's own error.
async function firstCoordinator(Service, conn, connectSeconds) {
  const open = (address) => ({ client: new Service(address, ...credentials(address, conn)), address });
  if (conn.addresses.length === 1) return open(conn.addresses[0]);
  for (const address of conn.addresses) {
    const found = await probe(open(address), connectSeconds);
    if (found) return found;
    console.error(`coordinator ${address} unreachable; trying the next one`);
  }
  return open(conn.addresses[0]);
}

async function probe(candidate, connectSeconds) {
  if (await connects(candidate.client, Date.now() + connectSeconds * 1000)) return candidate;
  candidate.client.close();
  return null;
}

// After a coordinator went away mid-stream: the first of the list that connects again
// (another one, or the same once it is back), trying until the deadline; null if none.
async function reconnectCoordinator(Service, conn, connectSeconds, deadline) {
  const open = (address) => ({ client: new Service(address, ...credentials(address, conn)), address });
  while (Date.now() < deadline) {
    for (const address of conn.addresses) {
      const found = await probe(open(address), connectSeconds);
      if (found) return found;
    }
    await new Promise((wake) => setTimeout(wake, 500));
  }
  return null;
}

// Prints one call's events. Resolves with the exit code, or with { lost: error } when the
// stream broke with UNAVAILABLE once the task was known (its coordinator went away).
function follow(client, call, state, conn) {
  return new Promise((resolve) => {
    let failed = false;
    call.on("data", ({ event }) => {
      console.log(`#${event.sequence} ${event.kind} ${describe(event)}`.trimEnd());
      if (event.kind === "snapshot") state.taskId = event.snapshot.task_id;
      state.lastSequence = Math.max(state.lastSequence, Number(event.sequence));
      if (event.kind === "finished") state.finished = event.finished;
    });
    call.on("error", (err) => {
      failed = true;
      client.close();
      if (err.code === grpc.status.UNAVAILABLE && state.taskId && state.finished === null) {
        resolve({ lost: err });
        return;
      }
      const code = grpc.status[err.code] || String(err.code);
      const reason = reasonOf(err);
      const details = err.details.replace(/\s*Resolution note:\s*$/, "");
      let hint = "";
      if (!conn.cert && err.code === grpc.status.UNAVAILABLE) {
        hint =
          " (no client certificate was given and the mesh only accepts mutual TLS:" +
          " get one with `hivewire certs issue --name <you>`)";
      } else if (/Failed to connect/.test(details)) {
        // grpc-js says no more when the server ends the TLS handshake.
        hint =
          " (the server refused the TLS handshake: is the client certificate from this" +
          " mesh's CA?)";
      }
      console.error(`error: ${code}${reason ? ` ${reason}` : ""}: ${details}${hint}`);
      resolve(EXIT_RPC_ERROR);
    });
    call.on("end", () => {
      client.close();
      if (failed) {
        return; // reported by the error handler
      } else if (state.finished === null) {
        console.error("error: the stream ended without a finished event");
        resolve(EXIT_NOT_SUCCEEDED);
      } else if (state.finished.state === "TASK_STATE_SUCCEEDED") {
        const output = payloadText(state.finished.output);
        if (output) console.log(output);
        resolve(EXIT_SUCCEEDED);
      } else {
        resolve(EXIT_NOT_SUCCEEDED);
      }
    });
  });
}

async function submit(opts) {
  const conn = connectionSettings(opts);
  const coordinator = loadCoordinator(opts.proto);
  const seconds = Number(opts.timeout);
  if (!(seconds > 0)) throw new UsageError("--timeout must be a positive number of seconds");
  const connectSeconds = Number(opts["connect-timeout"]);
  if (!(connectSeconds > 0)) {
    throw new UsageError("--connect-timeout must be a positive number of seconds");
  }
  const input = { text: opts.text };
  if (opts.json !== undefined) input.json = toStruct(JSON.parse(opts.json));
  const spec = {
    timeout: { seconds: Math.floor(seconds), nanos: Math.round((seconds % 1) * 1e9) },
  };
  if (opts.plan) {
    spec.plan = readPlan(opts.plan);
    if (opts.text || opts.json !== undefined) spec.input = input;
  } else {
    spec.capability = opts.capability;
    spec.input = input;
  }

  const Service = coordinator.CoordinatorService;
  const deadline = Date.now() + seconds * 1000;
  const state = { taskId: "", lastSequence: 0, finished: null };
  let { client, address } = await firstCoordinator(Service, conn, connectSeconds);
  let call = client.StreamTask({ spec }, { deadline });
  for (;;) {
    const outcome = await follow(client, call, state, conn);
    if (typeof outcome === "number") return outcome;
    // The coordinator went away mid-stream: watch the task on from the last event shown.
    const next = await reconnectCoordinator(Service, conn, connectSeconds, deadline);
    if (next === null) {
      console.error(
        `error: UNAVAILABLE: ${address} went away and no coordinator came back before the` +
          ` deadline (task ${state.taskId}, last event #${state.lastSequence})`,
      );
      return EXIT_RPC_ERROR;
    }
    ({ client, address } = next);
    console.error(
      `lost the coordinator (${outcome.lost.details}); following task ${state.taskId} on` +
        ` ${address} after event #${state.lastSequence}`,
    );
    call = client.WatchTask(
      { task_id: state.taskId, after_sequence: String(state.lastSequence), include_snapshot: false },
      { deadline },
    );
  }
}

async function main() {
  try {
    return await submit(options());
  } catch (err) {
    // Bad flags, unreadable files, malformed JSON: everything before the call itself.
    console.error(`error: ${err.message}`);
    return EXIT_USAGE;
  }
}

main().then((code) => {
  process.exitCode = code;
});
