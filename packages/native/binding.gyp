{
  "targets": [
    {
      "target_name": "livemig_native",
      "sources": ["src/shared_memory.cc", "src/socket_write.cc", "src/channel_writer.cc", "src/multifd_reader.cc", "src/place_pages.cc"],
      "cflags_cc": ["-std=c++17", "-Wall", "-Wno-cast-function-type"]
    }
  ]
}
