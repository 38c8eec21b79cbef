// model.toml: parse_model on arbitrary text (the [[layer]] and [transformer] forms, the op
// library's shape and cost checks, the graph checks of build_model).
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace dpart;
    const std::string text = fuzz::text_of(data, size);
    fuzz::expect_input_errors([&] {
        const Model m = parse_model(text, fuzz::input_name);
        if (m.layers.empty()) fuzz::finding("a model without layers was accepted");
        if (m.global_batch == 0) fuzz::finding("a model with global_batch 0 was accepted");
    });
    return 0;
}
