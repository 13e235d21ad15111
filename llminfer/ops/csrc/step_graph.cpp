// StepGraph: the nodes of one recorded decode step and their replay (see step_graph.h). A node is either one of
// our kernels writing into its recorded outputs, or a PyTorch operator called through the dispatcher with its
// recorded arguments, its result copied into the recorded output (or, for an in-place operator, left where the
// operator wrote it).

#include "step_graph.h"

#include <ATen/ScalarOps.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <unordered_map>
#include <vector>

namespace llminfer {

namespace {

std::unordered_map<std::string, NodeFactory>& graph_kernels() {
  static std::unordered_map<std::string, NodeFactory> kernels;
  return kernels;
}

// An argument as the schema types it; a Python number passed for a tensor (x * 2) becomes the 0-dim "wrapped
// number" tensor that Python's own call makes of it, so that type promotion stays the same.
c10::IValue to_ivalue(const pybind11::handle& value, const c10::Argument& argument) {
  const bool number = pybind11::isinstance<pybind11::int_>(value) || pybind11::isinstance<pybind11::float_>(value) ||
                      pybind11::isinstance<pybind11::bool_>(value);
  if (number && argument.type()->kind() == c10::TypeKind::TensorType) {
    at::Tensor wrapped = c10::scalar_to_tensor(torch::jit::toIValue(value, c10::NumberType::get()).toScalar());
    wrapped.unsafeGetTensorImpl()->set_wrapped_number(true);
    return wrapped;
  }
  return torch::jit::toIValue(value, argument.type());
}

class StepGraph {
 public:
  void add_kernel(const std::string& name, const pybind11::tuple& args) {
    auto found = graph_kernels().find(name);
    TORCH_CHECK(found != graph_kernels().end(), "kernel ", name, " cannot be replayed");
    nodes_.push_back(found->second(args));
  }

  // `outputs`: where the recorded call's tensors went (copied into at replay); empty for an in-place operator.
  void add_operator(const std::string& name, const std::string& overload, const pybind11::list& args,
                    const pybind11::dict& kwargs, std::vector<torch::Tensor> outputs) {
    const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    const c10::FunctionSchema& schema = handle.schema();
    TORCH_CHECK(args.size() <= schema.arguments().size(), name, ": more arguments than its schema");
    std::vector<c10::IValue> stack;
    for (size_t i = 0; i < schema.arguments().size(); ++i) {
      const auto& argument = schema.arguments()[i];
      if (i < args.size()) {
        stack.push_back(to_ivalue(args[i], argument));
      } else if (kwargs.contains(argument.name())) {
        stack.push_back(to_ivalue(kwargs[argument.name().c_str()], argument));
      } else {
        TORCH_CHECK(argument.default_value().has_value(), name, ": no value for argument ", argument.name());
        stack.push_back(*argument.default_value());
      }
    }
    nodes_.push_back([handle, stack, outputs]() {
      std::vector<c10::IValue> run = stack;
      handle.callBoxed(&run);
      for (size_t i = 0; i < outputs.size(); ++i) outputs[i].copy_(run.at(i).toTensor());
    });
  }

  void replay() const {
    for (const Node& node : nodes_) node();
  }

  size_t size() const { return nodes_.size(); }

 private:
  std::vector<Node> nodes_;
};

}  // namespace

void register_graph_kernel(const std::string& name, NodeFactory factory) {
  graph_kernels()[name] = std::move(factory);
}

void register_step_graph(pybind11::module& m) {
  pybind11::class_<StepGraph>(m, "StepGraph")
      .def(pybind11::init<>())
      .def("add_kernel", &StepGraph::add_kernel)
      .def("add_operator", &StepGraph::add_operator)
      .def("replay", &StepGraph::replay, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("__len__", &StepGraph::size);
}

}  // namespace llminfer
