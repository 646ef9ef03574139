// twilight bench --attn-dump / --attention: decode-attention benchmarks on the KV cache of a real
// prefill (issue 3, item 8). See bench_attn.cpp for what is measured and how.
#pragma once

namespace tw::cli {

// `twilight bench --attn-dump -m MODEL -f TEXT -c N [--steps S] [--layers a,b,c] -o FILE`
int cmd_bench_attn_dump(int argc, char** argv);
// `twilight bench --attention [-m MODEL] (--kv FILE | --text FILE [-c N]) [--ctx 4096,...] ...`
int cmd_bench_attention(int argc, char** argv);

}  // namespace tw::cli
