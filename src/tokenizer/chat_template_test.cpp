// apply_chat_template against jinja2 renderings of each model's own tokenizer.chat_template
// (tests/fixtures/tokenizer/*.json, from scripts/make_tokenizer_fixtures.py).
#include "tokenizer/chat_template.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/paths.h"

using nlohmann::json;

namespace tw {
namespace {

json load_fixture(const std::string& name) {
  const std::string path = std::string(TW_SOURCE_DIR) + "/tests/fixtures/tokenizer/" + name;
  std::ifstream f(path);
  if (!f) throw Error("missing fixture " + path + " (run scripts/make_tokenizer_fixtures.py)");
  return json::parse(f);
}

void check_model(const char* model_file, const char* fixture) {
  const gguf::File f = gguf::File::open(require_model(model_file));
  const json fx = load_fixture(fixture);
  int n = 0;
  for (const json& c : fx["chat"]) {
    std::vector<ChatMessage> msgs;
    for (const json& m : c["messages"]) msgs.push_back({m["role"], m["content"]});
    const bool agp = c["add_generation_prompt"];
    EXPECT_EQ(apply_chat_template(f, msgs, agp), c["expected"].get<std::string>())
        << fixture << " case " << n << " agp=" << agp;
    ++n;
  }
  EXPECT_GE(n, 16);
}

TEST(ChatTemplate, SmolLM2MatchesJinja) { check_model(kSmolLM2File, "smollm2.json"); }
TEST(ChatTemplate, Qwen25CoderMatchesJinja) { check_model(kQwen15File, "qwen25.json"); }
TEST(ChatTemplate, Qwen25Coder05MatchesJinja) { check_model(kQwen05File, "qwen25_05b_chat.json"); }

TEST(ChatTemplate, ShapesOfTheTwoFamilies) {
  const ChatTemplate smol{ChatFamily::SmolLM2, "SYS"};
  const ChatTemplate qwen{ChatFamily::Qwen25, "QSYS"};
  EXPECT_EQ(render_chat(smol, {{"user", "hi"}}, true),
            "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(render_chat(smol, {}, true), "<|im_start|>assistant\n");
  EXPECT_EQ(render_chat(qwen, {{"system", "S"}, {"user", "u"}}, false),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n");
  EXPECT_THROW(render_chat(qwen, {}, true), Error);
}

TEST(ChatTemplate, UnknownTemplateIsAnError) {
  try {
    parse_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}");
    ADD_FAILURE() << "accepted an unknown template";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unsupported chat template"), std::string::npos) << e.what();
  }
  // A one-character change to a known template is no longer recognised.
  const gguf::File f = gguf::File::open(require_model(kSmolLM2File));
  std::string t = f.get_str("tokenizer.chat_template");
  EXPECT_NO_THROW(parse_chat_template(t));
  EXPECT_NO_THROW(parse_chat_template(t + "\n"));  // trailing whitespace is ignored
  t[t.find("SmolLM")] = 's';
  EXPECT_THROW(parse_chat_template(t), Error);
}

}  // namespace
}  // namespace tw
