// The official Anthropic TypeScript SDK under node against a layerserve server's Messages API:
// create, stream, a tool round trip, count_tokens and an error.
// Usage: BASE_URL=http://127.0.0.1:8080 node messages_check.mjs   (no /v1: the SDK adds it)
import assert from "node:assert/strict";
import Anthropic from "@anthropic-ai/sdk";

const client = new Anthropic({ baseURL: process.env.BASE_URL ?? "http://localhost:8080", apiKey: "your-api-key",
                               maxRetries: 0 });
const model = "any-model-name";
const hello = [{ role: "user", content: "Say hello." }];

const message = await client.messages.create({ model, max_tokens: 12, temperature: 0, messages: hello });
assert.ok(message.id.startsWith("msg_"));
assert.equal(message.type, "message");
assert.equal(message.content[0].type, "text");
assert.ok(["end_turn", "max_tokens"].includes(message.stop_reason));

const stream = client.messages.stream({ model, max_tokens: 12, temperature: 0, messages: hello });
let streamed = "";
stream.on("text", (text) => { streamed += text; });
const final = await stream.finalMessage();
assert.equal(streamed, final.content[0].text);
assert.equal(streamed, message.content[0].text);

const weather = { name: "get_weather", description: "Get current weather for a city",
  input_schema: { type: "object", properties: { location: { type: "string" } }, required: ["location"] } };
const messages = [{ role: "user", content: "What's the weather in Tokyo?" }];
const call = await client.messages.create({ model, max_tokens: 48, temperature: 0, messages, tools: [weather],
                                            tool_choice: { type: "any" } });
assert.equal(call.stop_reason, "tool_use");
const use = call.content.at(-1);
assert.equal(use.type, "tool_use");
assert.ok(use.id.startsWith("toolu_"));
assert.equal(typeof use.input.location, "string");
messages.push({ role: "assistant", content: call.content },
              { role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: "Sunny, 22 C." }] });
const answer = await client.messages.create({ model, max_tokens: 24, temperature: 0, messages, tools: [weather] });
assert.equal(answer.content[0].type, "text");

const counted = await client.messages.countTokens({ model, messages: hello });
assert.equal(counted.input_tokens, message.usage.input_tokens + message.usage.cache_read_input_tokens);

let rejected = null;
try {
  await client.messages.create({ model, max_tokens: 4, messages: hello, thinking: { type: "enabled", budget_tokens: 1024 } });
} catch (err) {
  rejected = err;
}
assert.ok(rejected instanceof Anthropic.BadRequestError);
assert.equal(rejected.error.type, "error");
assert.equal(rejected.error.error.type, "invalid_request_error");

console.log(JSON.stringify({ ok: true, streamedChars: streamed.length, answerChars: answer.content[0].text.length }));
