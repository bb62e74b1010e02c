"""The builders both dashboards share: the datasource variable, the filter variables, and the
panel kinds (time series, stat, table) wired to that datasource."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import prometheus as prometheus_model
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    DataTransformerConfig,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

DATASOURCE_VARIABLE = "datasource"
# Every panel, row and query names its datasource through the variable, never a fixed uid.
DATASOURCE = DataSourceRef(type_val="prometheus", uid=f"${{{DATASOURCE_VARIABLE}}}")
ALL_VALUE = ".*"
TAGS = ["composemesh", "istio"]
REFRESH = "30s"


def builtin_annotations() -> dashboard.AnnotationQuery:
    """Grafana's own "Annotations & Alerts", the list Grafana gives every new dashboard (its
    dashboard loader expects ``annotations.list`` to be there)."""
    return (
        dashboard.AnnotationQuery()
        .name("Annotations & Alerts")
        .datasource(DataSourceRef(type_val="grafana", uid="-- Grafana --"))
        .built_in(1)
        .enable(True)
        .hide(True)
        .icon_color("rgba(0, 211, 255, 1)")
        .type("dashboard")
    )


def datasource_variable() -> dashboard.DatasourceVariable:
    """The Prometheus datasource the dashboard reads, chosen by the viewer."""
    return dashboard.DatasourceVariable(DATASOURCE_VARIABLE).label("Data source").type("prometheus")


def filter_variable(name: str, label: str, query: str) -> dashboard.QueryVariable:
    """A multi-value variable from ``query`` (``label_values(...)``) whose "All" is ``.*``, for
    regex matchers; it starts at "All"."""
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .query(query)
        .datasource(DATASOURCE)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(ALL_VALUE)
        .current(VariableOption(selected=True, text="All", value="$__all"))
    )


def row(title: str) -> dashboard.Row:
    """A row, on the same datasource as its panels."""
    return dashboard.Row(title).datasource(DATASOURCE)


def target(expr: str, legend: str, ref_id: str = "A") -> prometheus.Dataquery:
    """A range query over time."""
    return (prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id)
            .datasource(DATASOURCE).range())


def instant_target(expr: str, ref_id: str) -> prometheus.Dataquery:
    """An instant query, as a table row per series."""
    return (prometheus.Dataquery().expr(expr).ref_id(ref_id).datasource(DATASOURCE)
            .format(prometheus_model.PromQueryFormat.TABLE).instant())


def graph(title: str, description: str, unit: str, targets: list[prometheus.Dataquery],
          width: int = 12, height: int = 8) -> timeseries.Panel:
    """A time series panel of ``targets``, its legend a table with the last and max values."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
        .fill_opacity(10)
        .legend(
            common_builder.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(common_builder.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI))
    )
    for t in targets:
        panel = panel.with_target(t)
    return panel


def single(title: str, description: str, unit: str, query: prometheus.Dataquery,
           width: int = 6, height: int = 4) -> stat.Panel:
    """A stat panel showing the last value of one query."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
        .graph_mode(common.BigValueGraphMode.AREA)
        .with_target(query)
    )


def grid(title: str, description: str, targets: list[prometheus.Dataquery],
         renames: dict[str, str], width: int = 24, height: int = 8) -> table.Panel:
    """A table of instant queries, one row per label set: the queries' frames merged on their
    labels, the time column dropped and each ``Value #<refId>`` renamed by ``renames``."""
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(width)
        .height(height)
        .show_header(True)
        .cell_height(common.TableCellHeight.SM)
        .align(common.FieldTextAlignment.AUTO)
        .with_transformation(DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(DataTransformerConfig(
            id_val="organize",
            options={"excludeByName": {"Time": True}, "renameByName": renames},
        ))
    )
    for t in targets:
        panel = panel.with_target(t)
    return panel
