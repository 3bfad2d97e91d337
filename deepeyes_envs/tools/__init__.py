"""Tools the envs can offer. Importing this package registers the built-in ones."""

from .base import Tool, ToolContext, ToolError, ToolResult, make_tool, register_tool, registered_tools
from .contrast import ContrastTool
from .python import PythonTool
from .rotate import RotateTool
from .zoom import ZoomInTool

__all__ = ["Tool", "ToolContext", "ToolError", "ToolResult", "make_tool", "register_tool", "registered_tools",
           "ContrastTool", "PythonTool", "RotateTool", "ZoomInTool"]
