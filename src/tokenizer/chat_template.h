// Chat prompt rendering for the model families we target. Both use ChatML
// ("<|im_start|>role\ncontent<|im_end|>\n"); they differ in when the default system prompt is
// inserted and which roles are rendered:
//   SmolLM2  — default system turn when the first message is not "system"; every role rendered.
//   Qwen2.5  — system turn always first (the user's own or the default); user / assistant /
//              non-first system rendered as ChatML, "tool" turns folded into a user turn of
//              <tool_response> blocks, other roles dropped (the template's tool branches; tool
//              definitions and assistant tool_calls are not representable in ChatMessage).
// The family is recognised from statements of tokenizer.chat_template and the default system
// prompt is read from it; a template that matches neither throws tw::Error (no fallback).
// Output equals jinja2 rendering of the model's template (tests compare against it).
#pragma once
#include <string>
#include <string_view>
#include <vector>

#include "gguf/gguf.h"

namespace tw {

struct ChatMessage {
  std::string role, content;
};

enum class ChatFamily { SmolLM2, Qwen25 };

struct ChatTemplate {
  ChatFamily family;
  std::string default_system;  // system prompt used when the conversation has none
};

// Recognise a template text; throws tw::Error naming what is missing when it is not supported.
ChatTemplate parse_chat_template(std::string_view tmpl);
std::string render_chat(const ChatTemplate& t, const std::vector<ChatMessage>& msgs, bool add_generation_prompt);

// tokenizer.chat_template of f, recognised and rendered. add_generation_prompt appends
// "<|im_start|>assistant\n".
std::string apply_chat_template(const gguf::File& f, const std::vector<ChatMessage>& msgs, bool add_generation_prompt);

}  // namespace tw
