"""In-place surgery on an NNX module graph: find layers by path and swap them.

``nnx.recursive_map`` does the same on a clone; here the user's model object is rewritten
in place (each parent's attribute or container slot is set), shared submodules are converted
once and every reference to them is updated.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from flax import nnx
from flax.nnx import graphlib

from jaxquant.nn._config import path_to_name

__all__ = ["iter_modules", "module_paths", "replace_modules"]


def iter_modules(root: Any) -> Iterator[tuple[str, nnx.Module]]:
  """``(dotted path, module)`` of every submodule, each shared one once (first path)."""
  for path, node in nnx.iter_graph(root):
    if isinstance(node, nnx.Module):
      yield path_to_name(path), node


def module_paths(root: Any) -> dict[int, tuple[str, ...]]:
  """Every dotted path of every submodule, keyed by ``id``: a module shared by several
  parents (or slots) has several, which ``skip_modules`` / ``target_modules`` may name."""
  paths: dict[int, list[str]] = {}
  on_path: set[int] = set()

  def visit(node: Any, path: tuple[Any, ...]) -> None:
    impl = graphlib.get_node_impl(node)
    if impl is None or id(node) in on_path:
      return
    if isinstance(node, nnx.Module):
      paths.setdefault(id(node), []).append(path_to_name(path))
    on_path.add(id(node))
    for key, child in impl.node_dict(node).items():
      if _may_hold_modules(child):
        visit(child, (*path, key))
    on_path.discard(id(node))

  visit(root, ())
  return {k: tuple(v) for k, v in paths.items()}


def replace_modules(root: Any, fn: Callable[[str, Any], Any]) -> Any:
  """Apply ``fn(dotted_path, module)`` bottom-up to every module; where it returns another
  object, put that object in place of the module everywhere the module is referenced.

  Returns the (possibly replaced) root: the same object unless ``fn`` replaced the root.
  """
  results: dict[int, Any] = {}
  visiting: set[int] = set()

  def visit(node: Any, path: tuple[Any, ...]) -> Any:
    node_id = id(node)
    if node_id in results:
      return results[node_id]
    if node_id in visiting:  # a cycle: leave the back edge alone
      return node
    impl = graphlib.get_node_impl(node)
    if impl is None:
      return node
    visiting.add(node_id)
    for key, child in list(impl.node_dict(node).items()):
      if not _may_hold_modules(child):
        continue
      new_child = visit(child, (*path, key))
      if new_child is not child:
        if impl.set_key is None:
          raise ValueError(
              f"cannot replace the module at '{path_to_name((*path, key))}': it sits in an "
              f"immutable {type(node).__name__}; hold submodules in attributes, nnx.List or "
              "nnx.Dict")
        impl.set_key(node, key, new_child)
    visiting.discard(node_id)
    new_node = fn(path_to_name(path), node) if isinstance(node, nnx.Module) else node
    results[node_id] = new_node
    return new_node

  return visit(root, ())


def _may_hold_modules(x: Any) -> bool:
  if isinstance(x, nnx.Variable):
    return False
  return graphlib.get_node_impl(x) is not None
