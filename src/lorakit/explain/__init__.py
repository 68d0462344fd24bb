"""`lorakit explain`: what an adapter does to one input, token by token.

    from lorakit.explain import explain, page, summary
    found = explain(model, tokenizer, "Reverse the order of the words: red fox blue\\nAnswer:")
    print(summary.summary_text(found))
    page.write_html([found], "explain.html", "my adapter")

`core` computes (pure functions over a model and its adapters), `probe` instruments the adapted
modules, `attribution` splits the output change over them, `summary` and `page` report it; the
command line's part is `lorakit.cli.explain`.
"""

from .core import Component, Explanation, ModuleActivity, OutputStep, explain

__all__ = ["Component", "Explanation", "ModuleActivity", "OutputStep", "explain"]
