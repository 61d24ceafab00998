// The tool-calling issue's round trip in TypeScript (JS + JSDoc types), against a layerserve server:
// a call, the tool's result back in, a text answer; then the same call streamed.
// Usage: BASE_URL=http://127.0.0.1:8080/v1 node tools_check.mjs
import assert from "node:assert/strict";
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.BASE_URL ?? "http://localhost:8080/v1", apiKey: "your-api-key" });

/** @type {OpenAI.ChatCompletionTool[]} */
const tools = [{
  type: "function",
  function: {
    name: "get_weather",
    description: "Get current weather for a city",
    parameters: {
      type: "object",
      properties: { location: { type: "string" }, unit: { type: "string", enum: ["celsius", "fahrenheit"] } },
      required: ["location"],
    },
  },
}];

/** @type {OpenAI.ChatCompletionMessageParam[]} */
const messages = [{ role: "user", content: "What's the weather in Tokyo?" }];
const response = await client.chat.completions.create({ model: "any", messages, tools, max_tokens: 200 });
const message = response.choices[0].message;
assert.equal(response.choices[0].finish_reason, "tool_calls");
assert.equal(message.content, null);
const toolCall = message.tool_calls[0];
assert.ok(toolCall.id.startsWith("call_"));
assert.equal(toolCall.type, "function");
assert.equal(toolCall.function.name, "get_weather");
assert.equal(JSON.parse(toolCall.function.arguments).location, "Tokyo");

messages.push(message);
messages.push({ role: "tool", tool_call_id: toolCall.id, content: JSON.stringify({ temperature: 22 }) });
const final = await client.chat.completions.create({ model: "any", messages, tools, max_tokens: 200, seed: 1 });
const answer = final.choices[0].message.content;
console.log(answer);
assert.equal(typeof answer, "string");
assert.ok(answer.trim().length > 0);
assert.equal(final.choices[0].message.tool_calls, undefined);

// Streamed: the first piece of a call has id, type and name; argument pieces concatenate to JSON.
const stream = await client.chat.completions.create({
  model: "any", messages: [{ role: "user", content: "What's the weather in Tokyo?" }], tools, max_tokens: 200, stream: true,
});
const calls = [];
const finishes = [];
for await (const chunk of stream) {
  const choice = chunk.choices[0];
  for (const piece of choice?.delta?.tool_calls ?? []) {
    if (calls[piece.index] === undefined) {
      assert.ok(piece.id.startsWith("call_"));
      assert.equal(piece.type, "function");
      calls[piece.index] = { name: piece.function.name, arguments: piece.function.arguments ?? "" };
    } else {
      calls[piece.index].arguments += piece.function.arguments;
    }
  }
  if (choice?.finish_reason) finishes.push(choice.finish_reason);
}
assert.deepEqual(finishes, ["tool_calls"]);
assert.equal(calls.length, 1);
assert.equal(calls[0].name, "get_weather");
assert.equal(JSON.parse(calls[0].arguments).location, "Tokyo");
console.log(JSON.stringify({ ok: true, answerChars: answer.length, streamedCalls: calls.length }));
