// Load a TorchScript artifact written by `fxprune compile`, run a tensor of ones of the
// model's input shape and print every output value, one per line (9 significant digits,
// enough to round-trip float32).
//
// usage: fxprune_infer MODEL.ts [N,C,H,W]
// Without N,C,H,W the shape is read from the artifact's embedded fxprune.json.
#include <torch/script.h>

#include <iomanip>
#include <iostream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, ',')) {
    if (part.find_first_not_of(" \t") != std::string::npos) shape.push_back(std::stoll(part));
  }
  return shape;
}

// The "input_shape": [1, 3, 32, 32] entry of fxprune.json (a full JSON parser is overkill).
std::vector<int64_t> shape_from_metadata(const std::string& json) {
  std::smatch match;
  static const std::regex entry("\"input_shape\"\\s*:\\s*\\[([0-9,\\s]*)\\]");
  if (!std::regex_search(json, match, entry)) return {};
  return parse_shape(match[1].str());
}

// The first tensor of the output (models may return a tuple, list or dict).
at::Tensor first_tensor(const c10::IValue& value) {
  if (value.isTensor()) return value.toTensor();
  if (value.isTuple()) return first_tensor(value.toTupleRef().elements().at(0));
  if (value.isList()) return first_tensor(value.toListRef().at(0));
  if (value.isGenericDict()) return first_tensor(value.toGenericDict().begin()->value());
  throw std::runtime_error("the model returned no tensor");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.ts [N,C,H,W]\n";
    return 2;
  }
  torch::jit::ExtraFilesMap extra{{"fxprune.json", ""}};
  torch::jit::Module module;
  try {
    module = torch::jit::load(argv[1], torch::kCPU, extra);
  } catch (const c10::Error& error) {
    std::cerr << "error: cannot load " << argv[1] << ": " << error.what_without_backtrace()
              << "\n";
    return 1;
  }
  std::vector<int64_t> shape =
      argc == 3 ? parse_shape(argv[2]) : shape_from_metadata(extra["fxprune.json"]);
  if (shape.empty()) {
    std::cerr << "error: " << argv[1] << " has no fxprune.json input shape: pass N,C,H,W\n";
    return 2;
  }
  module.eval();
  torch::NoGradGuard no_grad;
  at::Tensor output;
  try {
    output = first_tensor(module.forward({torch::ones(shape)}));
  } catch (const std::exception& error) {
    std::cerr << "error: the model failed: " << error.what() << "\n";
    return 1;
  }
  at::Tensor values = output.to(torch::kDouble).contiguous().flatten();
  auto view = values.accessor<double, 1>();
  std::cout << std::setprecision(9);
  for (int64_t i = 0; i < view.size(0); ++i) std::cout << view[i] << "\n";
  return 0;
}
