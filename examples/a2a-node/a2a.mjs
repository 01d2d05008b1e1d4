#!/usr/bin/env node
// Talk to hivewire's A2A gateway with the official A2A JavaScript SDK (@a2a-js/sdk).
//
//   node a2a.mjs card                      the agent card, checked against the SDK's types
//   node a2a.mjs stream SKILL [TEXT]       send a message and stream the task to its end
//   node a2a.mjs cancel SKILL [TEXT]       start a task, cancel it once it works
//   node a2a.mjs ask SKILL ANSWER [TEXT]   start a task, answer its input request, stream to the end
//   node a2a.mjs get TASK_ID               the task, its status and artifacts
//
// Options: --url https://127.0.0.1:50055/ (the gateway; default from .hivewire/endpoints.json)
//          --ca certs/ca.pem --cert certs/client.pem --key certs/client.key (mutual TLS)
//          --token hwk_... (an API key or a JWT, sent as "Authorization: Bearer"; then no client
//          certificate is presented unless --cert is given; default: $HIVEWIRE_TOKEN)
// Every event is printed as one JSON line: {"event": "task"|"statusUpdate"|"artifactUpdate", ...}.

import { readFileSync, existsSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import { Agent, fetch as undiciFetch } from "undici";
import { AgentCard, Role, TaskState } from "@a2a-js/sdk";
import {
  ClientFactory,
  ClientFactoryOptions,
  DefaultAgentCardResolver,
  JsonRpcTransportFactory,
  createAuthenticatingFetchWithRetry,
} from "@a2a-js/sdk/client";

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    url: { type: "string" },
    ca: { type: "string", default: "certs/ca.pem" },
    cert: { type: "string" },
    key: { type: "string" },
    token: { type: "string", default: process.env.HIVEWIRE_TOKEN },
    "after-sequence": { type: "string" },
  },
});

function gatewayUrl() {
  if (opts.url) return opts.url;
  const endpoints = ".hivewire/endpoints.json";
  if (existsSync(endpoints)) return JSON.parse(readFileSync(endpoints, "utf8")).a2a.url;
  return "https://127.0.0.1:50055/";
}

// Node's fetch with the mesh CA and a client certificate (the default without a token), and
// the SDK's authenticating fetch adding the bearer token when one is given.
const certFile = opts.cert ?? (opts.token ? undefined : "certs/client.pem");
const keyFile = opts.key ?? (opts.token ? undefined : "certs/client.key");
const dispatcher = new Agent({
  connect: {
    ca: readFileSync(opts.ca),
    ...(certFile ? { cert: readFileSync(certFile), key: readFileSync(keyFile) } : {}),
  },
});
const tlsFetch = (input, init = {}) => undiciFetch(input, { ...init, dispatcher });
const gatewayFetch = opts.token
  ? createAuthenticatingFetchWithRetry(tlsFetch, {
      headers: async () => ({ Authorization: `Bearer ${opts.token}` }),
      shouldRetryWithHeaders: async () => undefined,
    })
  : tlsFetch;

const print = (value) => console.log(JSON.stringify(value));
const stateName = (state) => TaskState[state] ?? String(state);

function message(skill, text, { taskId = "", data } = {}) {
  const parts = [];
  if (text) parts.push({ content: { $case: "text", value: text }, metadata: undefined, filename: "", mediaType: "" });
  if (data) parts.push({ content: { $case: "data", value: data }, metadata: undefined, filename: "", mediaType: "" });
  return {
    tenant: "",
    message: {
      messageId: randomUUID(),
      contextId: "",
      taskId,
      role: Role.ROLE_USER,
      parts,
      metadata: skill ? { skill } : undefined,
      extensions: [],
      referenceTaskIds: [],
    },
    configuration: undefined,
    metadata: undefined,
  };
}

function describe(response) {
  const payload = response.payload;
  if (!payload) return { event: "empty" };
  const value = payload.value;
  switch (payload.$case) {
    case "task":
      return { event: "task", id: value.id, contextId: value.contextId, state: stateName(value.status?.state) };
    case "statusUpdate": {
      const parts = value.status?.message?.parts ?? [];
      return {
        event: "statusUpdate",
        taskId: value.taskId,
        state: stateName(value.status?.state),
        text: parts.filter((p) => p.content?.$case === "text").map((p) => p.content.value).join("\n"),
        data: parts.filter((p) => p.content?.$case === "data").map((p) => p.content.value),
        sequence: value.metadata?.hivewire?.sequence,
      };
    }
    case "artifactUpdate":
      return {
        event: "artifactUpdate",
        taskId: value.taskId,
        artifactId: value.artifact?.artifactId,
        append: value.append,
        lastChunk: value.lastChunk,
        parts: (value.artifact?.parts ?? []).map((p) => ({ [p.content?.$case]: p.content?.value })),
        sequence: value.metadata?.hivewire?.sequence,
      };
    default:
      return { event: payload.$case };
  }
}

async function client() {
  const factory = new ClientFactory(
    ClientFactoryOptions.createFrom(ClientFactoryOptions.default, {
      transports: [new JsonRpcTransportFactory({ fetchImpl: gatewayFetch })],
      cardResolver: new DefaultAgentCardResolver({ fetchImpl: gatewayFetch }),
    }),
  );
  return factory.createFromUrl(gatewayUrl());
}

const isFinal = (described) =>
  ["TASK_STATE_COMPLETED", "TASK_STATE_FAILED", "TASK_STATE_CANCELED", "TASK_STATE_REJECTED",
   "TASK_STATE_INPUT_REQUIRED"].includes(described.state) && described.event !== "task";

async function stream(a2a, request, onEvent = async () => {}) {
  let last;
  for await (const response of a2a.sendMessageStream(request)) {
    last = describe(response);
    print(last);
    await onEvent(last);
  }
  return last;
}

async function main() {
  const [command, ...args] = positionals;
  if (command === "card") {
    const response = await gatewayFetch(new URL(".well-known/agent-card.json", gatewayUrl()));
    const json = await response.json();
    // The SDK's own codec: every field must survive a round trip through its AgentCard type.
    const card = AgentCard.fromJSON(json);
    const roundTrip = AgentCard.toJSON(card);
    const same = JSON.stringify(sortKeys(roundTrip)) === JSON.stringify(sortKeys(json));
    print({
      event: "card",
      name: card.name,
      roundTrip: same,
      skills: card.skills.map((s) => s.id),
      interfaces: card.supportedInterfaces.map((i) => `${i.protocolBinding} ${i.url}`),
      streaming: card.capabilities?.streaming,
      security: Object.keys(card.securitySchemes),
    });
    return same ? 0 : 1;
  }
  const a2a = await client();
  if (command === "stream") {
    const [skill, text = ""] = args;
    const last = await stream(a2a, message(skill, text));
    return last?.state === "TASK_STATE_COMPLETED" ? 0 : 3;
  }
  if (command === "cancel") {
    const [skill, text = ""] = args;
    let taskId = "";
    let cancelled;
    const last = await stream(a2a, message(skill, text), async (event) => {
      if (event.event === "task") taskId = event.id;
      if (event.state === "TASK_STATE_WORKING" && !cancelled) {
        const task = await a2a.cancelTask({ tenant: "", id: taskId, metadata: undefined });
        cancelled = stateName(task.status?.state);
        print({ event: "cancelled", id: taskId, state: cancelled });
      }
    });
    return last?.state === "TASK_STATE_CANCELED" && cancelled === "TASK_STATE_CANCELED" ? 0 : 4;
  }
  if (command === "ask") {
    const [skill, answer, text = ""] = args;
    const first = await stream(a2a, message(skill, text));
    if (first?.state !== "TASK_STATE_INPUT_REQUIRED") return 5;
    const reply = message("", answer, { taskId: first.taskId });
    const last = await stream(a2a, reply);
    return last?.state === "TASK_STATE_COMPLETED" ? 0 : 3;
  }
  if (command === "resubscribe") {
    const [taskId] = args;
    const serviceParameters = opts["after-sequence"]
      ? { "Hivewire-After-Sequence": opts["after-sequence"] }
      : undefined;
    let last;
    for await (const response of a2a.resubscribeTask({ tenant: "", id: taskId }, { serviceParameters })) {
      last = describe(response);
      print(last);
    }
    return last && isFinal(last) ? 0 : 3;
  }
  if (command === "get") {
    const task = await a2a.getTask({ tenant: "", id: args[0], historyLength: undefined });
    print({
      event: "task",
      id: task.id,
      state: stateName(task.status?.state),
      artifacts: task.artifacts.map((a) => a.artifactId),
    });
    return 0;
  }
  console.error("usage: node a2a.mjs card | stream SKILL [TEXT] | cancel SKILL [TEXT] | ask SKILL ANSWER [TEXT] | resubscribe TASK_ID | get TASK_ID");
  return 2;
}

function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.keys(value).sort().map((k) => [k, sortKeys(value[k])]));
  }
  return value;
}

main().then(
  (code) => dispatcher.close().then(() => process.exit(code)),
  (error) => {
    console.error(`Error: ${error?.constructor?.name ?? "Error"}: ${error?.message ?? error}`);
    dispatcher.close().finally(() => process.exit(1));
  },
);
