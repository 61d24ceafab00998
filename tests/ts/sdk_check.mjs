// The TypeScript examples, run under node against a layerserve server.
// Usage: BASE_URL=http://127.0.0.1:8080/v1 node sdk_check.mjs   (MAX_TOKENS caps the examples' budgets)
import assert from "node:assert/strict";
import OpenAI from "openai";

const baseURL = process.env.BASE_URL ?? "http://localhost:8080/v1";
const cap = Number(process.env.MAX_TOKENS ?? "24");
const budget = (n) => (cap > 0 ? Math.min(n, cap) : n);

const client = new OpenAI({
  baseURL,
  apiKey: "your-api-key",
});

// Chat completion (non-streaming)
const response = await client.chat.completions.create({
  model: "meta-llama/Llama-4-Maverick-17B-128E-Original",
  messages: [
    { role: "system", content: "You are a helpful assistant." },
    { role: "user", content: "Explain the difference between TCP and UDP." },
  ],
  max_tokens: budget(300),
  temperature: 0.7,
});
console.log(response.choices[0].message.content);
assert.equal(typeof response.choices[0].message.content, "string");
assert.ok(response.choices[0].message.content.length > 0);
assert.equal(response.object, "chat.completion");
assert.ok(response.id.startsWith("chatcmpl-"));
assert.ok(["stop", "length"].includes(response.choices[0].finish_reason));
assert.equal(response.usage.total_tokens, response.usage.prompt_tokens + response.usage.completion_tokens);

// Streaming
const stream = await client.chat.completions.create({
  model: "meta-llama/Llama-4-Maverick-17B-128E-Original",
  messages: [
    { role: "user", content: "Write a short poem about distributed systems." },
  ],
  max_tokens: budget(200),
  stream: true,
  stream_options: { include_usage: true },
});
let streamed = "";
let chunks = 0;
let finishReason = null;
let usage = null;
for await (const chunk of stream) {
  chunks += 1;
  const content = chunk.choices[0]?.delta?.content;
  if (content) {
    process.stdout.write(content);
    streamed += content;
  }
  finishReason = chunk.choices[0]?.finish_reason ?? finishReason;
  usage = chunk.usage ?? usage;
}
console.log();
assert.ok(streamed.length > 0, "stream carried no content");
assert.ok(chunks >= 3);
assert.ok(["stop", "length"].includes(finishReason));
assert.ok(usage && usage.completion_tokens > 0);

// Multi-turn
const messages = [
  { role: "system", content: "You are a Python tutor." },
  { role: "user", content: "What is a list comprehension?" },
];
const first = await client.chat.completions.create({
  model: "meta-llama/Llama-4-Maverick-17B-128E-Original", messages, max_tokens: budget(200),
});
messages.push({ role: "assistant", content: first.choices[0].message.content });
messages.push({ role: "user", content: "Show me a nested example." });
const second = await client.chat.completions.create({
  model: "meta-llama/Llama-4-Maverick-17B-128E-Original", messages, max_tokens: budget(200),
});
assert.ok(second.usage.prompt_tokens > first.usage.prompt_tokens);

// Errors surface as the SDK's typed errors
await assert.rejects(
  client.chat.completions.create({ model: "x", messages: [], max_tokens: 2 }),
  (err) => err instanceof OpenAI.BadRequestError && err.status === 400 && typeof err.message === "string",
);

const models = await client.models.list();
assert.deepEqual(models.data.map((m) => m.id), ["SmolLM2-135M-Instruct"]);

console.log(JSON.stringify({ ok: true, streamedChars: streamed.length, chunks }));
