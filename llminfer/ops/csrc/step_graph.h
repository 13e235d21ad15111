// A decode step recorded once and replayed from C++ (llminfer/engine/step_graph.py): the kernels that the
// step's ops called, each bound to the same input and output tensors, in call order.
#pragma once

#include <torch/extension.h>

#include <functional>
#include <string>
#include <tuple>
#include <utility>

namespace llminfer {

using Node = std::function<void()>;
using NodeFactory = std::function<Node(const pybind11::tuple& args)>;

// Kernels that can be replayed register the form that writes into given outputs, under the name the module
// exports their allocating form with: the recorded call's arguments followed by its outputs.
void register_graph_kernel(const std::string& name, NodeFactory factory);

template <typename... Args, size_t... I>
Node bind_node(void (*kernel)(Args...), const pybind11::tuple& args, std::index_sequence<I...>) {
  auto bound = std::make_tuple(pybind11::cast<std::decay_t<Args>>(args[I])...);
  return [kernel, bound]() { std::apply(kernel, bound); };
}

template <typename... Args>
NodeFactory node_factory(void (*kernel)(Args...)) {
  return [kernel](const pybind11::tuple& args) {
    TORCH_CHECK(args.size() == sizeof...(Args), "a recorded kernel call has ", args.size(),
                " arguments and outputs, its replay takes ", sizeof...(Args));
    return bind_node(kernel, args, std::index_sequence_for<Args...>{});
  };
}

void register_step_graph(pybind11::module& m);

}  // namespace llminfer
