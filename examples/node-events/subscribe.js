#!/usr/bin/env node
// A hivewire event subscriber in Node.js.
//
// It reads the HIVEWIRE_EVENTS JetStream stream through an ordered consumer (no state
// left on the server), decodes each message as a hivewire.events.v1.Event protobuf
// loaded at run time from the repository's proto/ directory, and prints one line per
// event: stream sequence, type, subject, task sequence and the data's category.
//
// Usage:
//   node subscribe.js [--server tls://127.0.0.1:4222] [--certs DIR] [--identity client]
//                     [--filter 'task.>'] [--from-seq N | --new] [--count N] [--json]
//                     [--proto DIR]
//
// The mesh's NATS (tls://) wants a client certificate of the mesh CA: <certs>/ca.pem,
// <certs>/<identity>.pem and .key (the client identity may read events, not write them),
// and receives replies only under its own inbox prefix, _INBOX.<role>.<name> of the
// certificate's SPIFFE id.
// Without --count it follows new events until Ctrl-C.
"use strict";

const { X509Certificate } = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");
const { connect, DeliverPolicy } = require("nats");
const protobuf = require("protobufjs");

const STREAM = "HIVEWIRE_EVENTS";
const TRUST_DOMAIN = "spiffe://hivewire.local/";

// The reply prefix the mesh's NATS lets this identity subscribe to.
function inboxPrefix(certFile) {
  const sans = new X509Certificate(fs.readFileSync(certFile)).subjectAltName || "";
  const uri = sans
    .split(", ")
    .map((san) => san.replace(/^URI:/, ""))
    .find((san) => san.startsWith(TRUST_DOMAIN));
  if (!uri) return undefined;
  const [role, name] = uri.slice(TRUST_DOMAIN.length).split("/");
  return `_INBOX.${role}.${name}`;
}

function options() {
  const { values } = parseArgs({
    options: {
      server: { type: "string", default: process.env.NATS_URL || "tls://127.0.0.1:4222" },
      certs: { type: "string", default: "certs" },
      identity: { type: "string", default: "client" },
      filter: { type: "string", default: ">" },
      "from-seq": { type: "string" },
      new: { type: "boolean", default: false },
      count: { type: "string" },
      json: { type: "boolean", default: false },
      proto: { type: "string", default: path.resolve(__dirname, "..", "..", "proto") },
    },
  });
  return values;
}

// Load events.proto and what it imports from proto/; protobufjs ships the
// google/protobuf well-known types itself.
async function loadEventType(protoDir) {
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) =>
    path.isAbsolute(target) ? target : path.join(protoDir, target);
  await root.load("hivewire/events/v1/events.proto", { keepCase: true });
  return root.lookupType("hivewire.events.v1.Event");
}

async function main() {
  const opts = options();
  const Event = await loadEventType(opts.proto);
  const limit = opts.count === undefined ? Infinity : Number(opts.count);

  const servers = opts.server.split(",");
  const connectOptions = { servers, name: "hivewire-node-events" };
  if (servers.some((s) => s.startsWith("tls://"))) {
    connectOptions.servers = servers.map((s) => s.replace(/^tls:\/\//, ""));
    const certFile = path.join(opts.certs, `${opts.identity}.pem`);
    connectOptions.tls = {
      caFile: path.join(opts.certs, "ca.pem"),
      certFile,
      keyFile: path.join(opts.certs, `${opts.identity}.key`),
    };
    connectOptions.inboxPrefix = inboxPrefix(certFile);
  }
  const nc = await connect(connectOptions);
  const js = nc.jetstream();
  const consumerOptions = { filterSubjects: [`hivewire.events.${opts.filter}`] };
  if (opts["from-seq"] !== undefined) {
    consumerOptions.deliver_policy = DeliverPolicy.StartSequence;
    consumerOptions.opt_start_seq = Number(opts["from-seq"]);
  } else if (opts.new) {
    consumerOptions.deliver_policy = DeliverPolicy.New;
  }
  const consumer = await js.consumers.get(STREAM, consumerOptions);
  const messages = await consumer.consume();

  const stop = async () => {
    await messages.close();
    await nc.drain();
  };
  process.once("SIGINT", stop);
  process.once("SIGTERM", stop);

  let seen = 0;
  for await (const m of messages) {
    const event = Event.toObject(Event.decode(m.data), {
      longs: String,
      enums: String,
      defaults: false,
      oneofs: true,
    });
    if (opts.json) {
      console.log(JSON.stringify({ stream_sequence: m.seq, msg_id: m.headers?.get("Nats-Msg-Id"), event }));
    } else {
      console.log(
        [
          `#${m.seq}`,
          event.type,
          event.subject || "-",
          `task_sequence=${event.task_sequence || 0}`,
          `data=${event.data || "-"}`,
          `id=${event.id}`,
        ].join(" "),
      );
    }
    seen += 1;
    if (seen >= limit) {
      break;
    }
  }
  await stop();
}

main().catch((err) => {
  console.error(`error: ${err.message || err}`);
  process.exit(1);
});
