import json
from tests.test_docs import _outputs

def paths(doc, prefix):
    out = {}
    def walk(node, p):
        if isinstance(node, dict):
            out.setdefault(p, set()).update(node.keys())
            for k, v in node.items():
                walk(v, k if p == "." else f"{p}.{k}")
        elif isinstance(node, list):
            for v in node:
                walk(v, "[]" if p == "." else f"{p}[]")
    walk(doc, prefix)
    return out

def test_dump(cli, conn, tmp_path):
    docs = _outputs(cli, conn, tmp_path)
    with open("/tmp/docsrun/dump.txt", "w") as fh:
        for name, doc in docs.items():
            fh.write(f"=== {name}\n")
            for p, keys in paths(doc, ".").items():
                fh.write(f"- `{p}`: " + ", ".join(f"`{k}`" for k in keys) + "\n")
    with open("/tmp/docsrun/dump.json", "w") as fh:
        json.dump(docs, fh, indent=1, default=str)
