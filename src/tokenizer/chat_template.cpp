#include "tokenizer/chat_template.h"

#include <algorithm>
#include <cstdint>

#include "common/error.h"

namespace tw {

namespace {

// Templates are recognised by an FNV-1a-64 fingerprint of their exact text (trailing whitespace
// trimmed): we do not interpret Jinja, so only texts whose rendering we reproduced (and test
// against jinja2) are accepted.
uint64_t fnv1a(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

struct Known {
  uint64_t hash;
  ChatFamily family;
  const char* default_system;
  const char* what;
};

constexpr const char* kSmolSystem = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
constexpr const char* kQwenSystem = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

constexpr Known kKnown[] = {
    {0x45ec583d4d25bc3aull, ChatFamily::SmolLM2, kSmolSystem, "SmolLM2-Instruct"},
    // The two Qwen2.5 texts differ only in the tool-call example of the tools branch
    // ("{{...}}" vs "{...}"), which ChatMessage cannot reach.
    {0xadaa2a0bbac0305full, ChatFamily::Qwen25, kQwenSystem, "Qwen2.5(-Coder)-Instruct, 1.5B variant"},
    {0xe642ce246d7f2e3dull, ChatFamily::Qwen25, kQwenSystem, "Qwen2.5(-Coder)-Instruct"},
};

void chatml(std::string& out, std::string_view role, std::string_view content) {
  out += "<|im_start|>";
  out += role;
  out += '\n';
  out += content;
  out += "<|im_end|>\n";
}

}  // namespace

ChatTemplate parse_chat_template(std::string_view tmpl) {
  std::string_view t = tmpl;
  while (!t.empty() && (t.back() == ' ' || t.back() == '\n' || t.back() == '\t' || t.back() == '\r')) t.remove_suffix(1);
  const uint64_t h = fnv1a(t);
  for (const Known& k : kKnown)
    if (k.hash == h) return ChatTemplate{k.family, k.default_system};
  const std::string_view head = t.substr(0, std::min<size_t>(t.size(), 60));
  fail("unsupported chat template (fnv1a64 0x", std::hex, h, std::dec, ", ", t.size(), " bytes, starts with '",
       std::string(head), "'): only the SmolLM2-Instruct and Qwen2.5-Instruct ChatML templates are implemented");
}

std::string render_chat(const ChatTemplate& t, const std::vector<ChatMessage>& msgs, bool add_generation_prompt) {
  std::string out;
  switch (t.family) {
    case ChatFamily::SmolLM2:
      for (size_t i = 0; i < msgs.size(); ++i) {
        if (i == 0 && msgs[0].role != "system") chatml(out, "system", t.default_system);
        chatml(out, msgs[i].role, msgs[i].content);
      }
      break;
    case ChatFamily::Qwen25: {
      // The template reads messages[0] unconditionally; jinja2 fails on an empty list, so do we.
      TW_CHECK(!msgs.empty(), "chat template (Qwen2.5): the conversation has no messages");
      if (msgs[0].role == "system") {
        chatml(out, "system", msgs[0].content);
      } else {
        chatml(out, "system", t.default_system);
      }
      for (size_t i = 0; i < msgs.size(); ++i) {
        const ChatMessage& m = msgs[i];
        if (m.role == "user" || (m.role == "system" && i != 0) || m.role == "assistant") {
          chatml(out, m.role, m.content);
        } else if (m.role == "tool") {
          // Consecutive tool results share one user turn.
          if (i == 0 || msgs[i - 1].role != "tool") out += "<|im_start|>user";
          out += "\n<tool_response>\n";
          out += m.content;
          out += "\n</tool_response>";
          if (i + 1 == msgs.size() || msgs[i + 1].role != "tool") out += "<|im_end|>\n";
        }  // any other role: the template renders nothing
      }
      break;
    }
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

std::string apply_chat_template(const gguf::File& f, const std::vector<ChatMessage>& msgs, bool add_generation_prompt) {
  const gguf::Value* v = f.find("tokenizer.chat_template");
  TW_CHECK(v != nullptr, f.path(), ": no tokenizer.chat_template in the model metadata");
  TW_CHECK(v->type == gguf::ValueType::STRING, f.path(), ": tokenizer.chat_template is not a string");
  ChatTemplate t;
  try {
    t = parse_chat_template(v->s);
  } catch (const Error& e) {
    fail(f.path(), ": ", e.what());
  }
  return render_chat(t, msgs, add_generation_prompt);
}

}  // namespace tw
