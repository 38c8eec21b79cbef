#include "dpart/cost/layer_times.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "dpart/core/error.hpp"

namespace dpart {

std::optional<double> LayerTimes::seconds(std::size_t layer, Pass pass, std::uint64_t samples) const {
    const auto it = layers.find(layer);
    if (it == layers.end() || it->second.empty()) return std::nullopt;
    const std::vector<Point>& p = it->second;
    const auto t = [&](const Point& x) { return pass == Pass::forward ? x.forward_s : x.backward_s; };
    const double q = static_cast<double>(samples);
    if (p.size() == 1) return t(p[0]) * q / static_cast<double>(p[0].samples);
    // The segment holding q, or the nearest one at either end.
    std::size_t k = 1;
    while (k + 1 < p.size() && static_cast<double>(p[k].samples) < q) ++k;
    const double x0 = static_cast<double>(p[k - 1].samples), x1 = static_cast<double>(p[k].samples);
    const double y = t(p[k - 1]) + (t(p[k]) - t(p[k - 1])) * (q - x0) / (x1 - x0);
    return std::max(0.0, y);
}

const std::vector<std::string>& layer_time_columns() {
    static const std::vector<std::string> c{"model", "kind", "layer", "samples", "fwd_ms", "bwd_ms"};
    return c;
}

CsvTable layer_times_table(const LayerTimes& t, const Model& model) {
    CsvTable table(layer_time_columns());
    for (const auto& [layer, points] : t.layers)
        for (const LayerTimes::Point& p : points)
            table.add_row({t.model, t.kind, model.layers.at(layer).name, std::to_string(p.samples),
                           fmt::format("{:.6g}", p.forward_s * 1e3), fmt::format("{:.6g}", p.backward_s * 1e3)});
    return table;
}

LayerTimes load_layer_times(const std::string& path, const Model& model) {
    const CsvFile f = read_csv(path, layer_time_columns());
    LayerTimes t;
    t.model = model.name;
    std::map<std::string, std::size_t> index;
    for (std::size_t l = 0; l < model.layers.size(); ++l) index.emplace(model.layers[l].name, l);
    for (std::size_t r = 0; r < f.rows.size(); ++r) {
        const auto& row = f.rows[r];
        const SourceLocation at{path, f.lines[r], 0};
        if (row[0] != model.name)
            throw InputError(at, fmt::format("column \"model\": these times are for \"{}\", not \"{}\"", row[0], model.name));
        if (r == 0) t.kind = row[1];
        if (row[1] != t.kind)
            throw InputError(at, fmt::format("column \"kind\": \"{}\" after \"{}\": one file holds one device kind's times",
                                             row[1], t.kind));
        const auto layer = index.find(row[2]);
        if (layer == index.end())
            throw InputError(at, fmt::format("column \"layer\": model \"{}\" has no layer \"{}\"", model.name, row[2]));
        const double samples = csv_number(f, r, 3), fwd = csv_number(f, r, 4), bwd = csv_number(f, r, 5);
        if (!(samples >= 1) || samples != std::floor(samples) || samples > 1e15)
            throw InputError(at, fmt::format("column \"samples\": \"{}\" is not a positive whole number", row[3]));
        if (fwd < 0 || bwd < 0 || fwd > 1e9 || bwd > 1e9)
            throw InputError(at, "columns \"fwd_ms\", \"bwd_ms\": a time must be between 0 and 1e9 ms");
        std::vector<LayerTimes::Point>& points = t.layers[layer->second];
        const auto q = static_cast<std::uint64_t>(samples);
        if (std::any_of(points.begin(), points.end(), [&](const auto& p) { return p.samples == q; }))
            throw InputError(at, fmt::format("layer \"{}\" at {} samples is given twice", row[2], q));
        points.push_back({q, fwd * 1e-3, bwd * 1e-3});
    }
    for (auto& [layer, points] : t.layers)
        std::sort(points.begin(), points.end(), [](const auto& a, const auto& b) { return a.samples < b.samples; });
    return t;
}

MeasuredCostModel::MeasuredCostModel(const CostModel& base, const Model& model, const Cluster& cluster, LayerTimes times)
    : base_(base), model_(model), times_(std::move(times)) {
    std::map<std::pair<std::size_t, bool>, std::size_t> ids;
    for (std::size_t d = 0; d < cluster.devices.size(); ++d) {
        const bool m = !times_.layers.empty() && cluster.devices[d].kind == times_.kind;
        measured_.push_back(m);
        measured_devices_ += m ? 1 : 0;
        class_.push_back(ids.emplace(std::pair{base.device_class(d), m}, ids.size()).first->second);
    }
}

double MeasuredCostModel::layer_seconds(std::size_t layer, Pass pass, std::size_t device, std::uint64_t samples,
                                        std::uint32_t tp) const {
    if (!measured_.at(device)) return base_.layer_seconds(layer, pass, device, samples, tp);
    const std::optional<double> s = times_.seconds(layer, pass, samples);
    if (!s) return base_.layer_seconds(layer, pass, device, samples, tp);
    if (tp <= 1) return *s;
    // Split where the base model splits it (tp_splits under its options: its time then differs
    // from the whole layer's): the measured work shared tp ways, plus the all-reduces the base
    // model prices (its split time less its compute share).
    const double whole = base_.layer_seconds(layer, pass, device, samples, 1);
    const double split = base_.layer_seconds(layer, pass, device, samples, tp);
    if (split == whole) return *s;
    const double collectives = std::max(0.0, split - whole / tp);
    return *s / tp + collectives;
}

}  // namespace dpart
