// Dataset index builders compiled for speed; megatron_llama/data/helpers.py holds the numpy twins
// (identical output) and the documentation of both functions.
//
// build_sample_idx: cuts the token stream of documents taken in doc_idx order into samples of
//   seq_length + 1 tokens, each overlapping the next by one token (the last input is the next sample's
//   first). Row i is (position in doc_idx, token offset) of sample i's first token; row i + 1 marks its
//   last token (inclusive). Row 0 is (0, 0).
// build_blending_indices: Tijdeman's chairman-assignment rule (Discrete Math. 32, 1980): at step t
//   (1-based) the datasets lagging their target weight * t by at least 1/(2K-2) are eligible, and the one
//   whose deficit would reach 1 - 1/(2K-2) first is chosen. Every prefix then holds each dataset within
//   1 - 1/(2K-2) < 1 sample of weight * prefix length.
//
// Build in place: python setup.py build_ext --inplace   (module megatron_llama.data._helpers)
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

template <typename DocIndex>
py::array_t<int64_t> build_sample_idx(py::array_t<int32_t, py::array::c_style> sizes,
                                      py::array_t<DocIndex, py::array::c_style> doc_idx, int64_t seq_length,
                                      int64_t num_epochs, int64_t tokens_per_epoch) {
    if (seq_length < 1) throw std::invalid_argument("seq_length must be at least 1, got " + std::to_string(seq_length));
    if (num_epochs < 1 || tokens_per_epoch < 1)
        throw std::invalid_argument("num_epochs and tokens_per_epoch must be at least 1, got " +
                                    std::to_string(num_epochs) + " and " + std::to_string(tokens_per_epoch));
    if (tokens_per_epoch > std::numeric_limits<int64_t>::max() / num_epochs)
        throw std::invalid_argument("num_epochs * tokens_per_epoch overflows int64");
    const int64_t num_samples = (num_epochs * tokens_per_epoch - 1) / seq_length;
    const int32_t* document_sizes = sizes.data();
    const DocIndex* documents = doc_idx.data();
    const int64_t num_sizes = sizes.size();
    const int64_t num_positions = doc_idx.size();

    py::array_t<int64_t> sample_idx({num_samples + 1, int64_t{2}});
    int64_t* out = sample_idx.mutable_data();
    std::string error;
    {
        py::gil_scoped_release release;
        int64_t position = 0;  // index into doc_idx
        int64_t offset = 0;    // token offset inside documents[position]
        out[0] = 0;
        out[1] = 0;
        for (int64_t sample = 1; sample <= num_samples && error.empty(); ++sample) {
            int64_t remaining = seq_length + 1;  // tokens still to take, counting the shared first token
            while (remaining != 0) {
                if (position >= num_positions) {
                    error = "doc_idx holds fewer tokens than num_epochs * tokens_per_epoch = " +
                            std::to_string(num_epochs * tokens_per_epoch) + " (ran out at sample " +
                            std::to_string(sample) + ")";
                    break;
                }
                const int64_t document = static_cast<int64_t>(documents[position]);
                if (document < 0 || document >= num_sizes) {
                    error = "doc_idx[" + std::to_string(position) + "] = " + std::to_string(document) +
                            " is not a document of sizes (length " + std::to_string(num_sizes) + ")";
                    break;
                }
                const int64_t available = static_cast<int64_t>(document_sizes[document]) - offset;
                remaining -= available;
                if (remaining <= 0) {
                    offset += remaining + available - 1;  // the sample's last token; the next sample starts on it
                    remaining = 0;
                } else {
                    ++position;
                    offset = 0;
                }
            }
            out[2 * sample] = position;
            out[2 * sample + 1] = offset;
        }
    }
    if (!error.empty()) throw std::invalid_argument(error);
    return sample_idx;
}

template <typename DatasetIndex>
py::tuple build_blending_indices_typed(const double* weights, int64_t num_datasets, int64_t size) {
    py::array_t<DatasetIndex> dataset_index(size);
    py::array_t<int64_t> dataset_sample_index(size);
    DatasetIndex* chosen = dataset_index.mutable_data();
    int64_t* sample_in_dataset = dataset_sample_index.mutable_data();
    {
        py::gil_scoped_release release;
        std::vector<double> taken(num_datasets, 0.0);
        const double eligibility = num_datasets > 1 ? 1.0 / static_cast<double>(2 * num_datasets - 2) : 0.0;
        for (int64_t step = 0; step < size; ++step) {
            const double t = static_cast<double>(step + 1);
            int64_t best = -1;
            double best_deadline = 0.0;
            int64_t most_behind = 0;
            double largest_deficit = -std::numeric_limits<double>::infinity();
            for (int64_t i = 0; i < num_datasets; ++i) {
                const double deficit = weights[i] * t - taken[i];
                if (deficit > largest_deficit) {
                    largest_deficit = deficit;
                    most_behind = i;
                }
                if (weights[i] > 0.0 && deficit >= eligibility) {
                    const double deadline = (taken[i] + 1.0 - eligibility) / weights[i];
                    if (best < 0 || deadline < best_deadline) {
                        best = i;
                        best_deadline = deadline;
                    }
                }
            }
            if (best < 0) best = most_behind;  // only reachable through rounding; keeps the stream going
            chosen[step] = static_cast<DatasetIndex>(best);
            sample_in_dataset[step] = static_cast<int64_t>(taken[best]);
            taken[best] += 1.0;
        }
    }
    return py::make_tuple(dataset_index, dataset_sample_index);
}

py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights, int64_t size) {
    const int64_t num_datasets = weights.size();
    if (num_datasets < 1 || num_datasets > std::numeric_limits<int16_t>::max())
        throw std::invalid_argument("blending needs 1 to 32767 datasets, got " + std::to_string(num_datasets));
    if (size < 0) throw std::invalid_argument("size must be non-negative, got " + std::to_string(size));
    if (num_datasets <= std::numeric_limits<uint8_t>::max())
        return build_blending_indices_typed<uint8_t>(weights.data(), num_datasets, size);
    return build_blending_indices_typed<int16_t>(weights.data(), num_datasets, size);
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
    m.doc() = "Compiled dataset index builders; see megatron_llama/data/helpers.py";
    m.def("build_sample_idx", &build_sample_idx<int32_t>, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
          py::arg("num_epochs"), py::arg("tokens_per_epoch"));
    m.def("build_sample_idx", &build_sample_idx<int64_t>, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
          py::arg("num_epochs"), py::arg("tokens_per_epoch"));
    m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"));
}
