"""What ``visiondrop_pocket.yaml`` names (lmms-eval loads this file by path; the code lives in the package)."""

from visiondrop.integrations.lmms_eval.pocket import PocketTask, doc_to_text, doc_to_visual, process_results

__all__ = ["PocketTask", "doc_to_text", "doc_to_visual", "process_results"]
